"""iwp.export: ONNX export of the vision, prefill and decode graphs with the selection inside (issue: export)."""
