"""The applications: opening a model (bundles built on first use), rank requests, the HTTP server and its load test."""
