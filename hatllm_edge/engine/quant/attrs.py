"""A node's attributes as a plain dict (every decoder reads its block sizes and shapes there)."""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
