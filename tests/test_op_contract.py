"""The VisualTokenSelect contract: one list of attributes, an ONNX schema that accepts the node, an export
that emits it, and ONNX Runtime giving the reference's indices."""
import dataclasses

import onnx
import pytest
import torch
from conftest import synthetic_view

from iwp.plugins.visual_token_select.onnx_op import custom_translation_table, register_schema, schema
from iwp.plugins.visual_token_select import METHODS, contract, make_method
from iwp.plugins.visual_token_select.torch_op import select
from iwp.plugins.visual_token_select.ort_op import ORT_DOMAIN, for_onnxruntime, session


def test_schema_attributes_come_from_the_contract():
    names = {a for a in schema().attributes}
    expected = set(contract.CORE_ATTRIBUTES) | set(contract.method_attributes())
    assert names == expected
    for cls in METHODS.values():  # every option of every method is an attribute
        assert {f.name for f in dataclasses.fields(cls.Config)} <= names
    assert [p.name for p in schema().inputs] == list(contract.INPUTS)


def test_schema_input_types_are_the_contracts_dtypes():
    onnx_names = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)",
                  "int32": "tensor(int32)", "int64": "tensor(int64)"}
    s = schema()
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in s.type_constraints}
    for param in s.inputs:
        assert allowed[param.type_str] == {onnx_names[d] for d in contract.INPUT_DTYPES[param.name]}, param.name
    assert allowed[s.outputs[0].type_str] == {onnx_names[contract.OUTPUT_DTYPE]}
    assert set(contract.INPUT_DTYPES) == set(contract.INPUTS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_node_attributes_round_trip_to_the_same_method(name):
    method = make_method(name)
    attrs = contract.node_attributes(method, keep=5, layer_index=2, stage=0, n_stages=1)
    assert attrs["plugin_namespace"] == "iwp" and attrs["plugin_version"] == "1"
    assert contract.method_from_attributes(attrs).config == method.config


def test_unknown_method_and_bad_option_fail_at_load():
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        contract.method_from_attributes({"method": "magic"})
    with pytest.raises(ValueError, match="lam must be in"):
        contract.method_from_attributes({"method": "iwp", "lam": 3.0})


class SelectOnly(torch.nn.Module):
    def __init__(self, method, keep, n_stages=1):
        super().__init__()
        self.method, self.keep, self.n_stages = method, keep, n_stages

    def forward(self, hidden, q, k, q_rot, k_rot, v, key_mask, visual_start, query_idx, query_mask, last_idx,
                visual_xy, ttv):
        from iwp.plugins.visual_token_select.view import LayerView
        view = LayerView(hidden, q, k, q_rot, k_rot, v, key_mask, visual_start, visual_xy.shape[1], query_idx,
                         query_mask, last_idx, visual_xy, ttv, 2, 0, self.n_stages)
        return select(self.method, view, self.keep)


def _inputs(view):
    return tuple(getattr(view, name) for name in contract.INPUTS)


def _export(module, args) -> onnx.ModelProto:
    program = torch.onnx.export(module, args, dynamo=True, custom_translation_table=custom_translation_table(),
                                verbose=False)
    return program.model_proto


@pytest.mark.parametrize("name", sorted(METHODS))
def test_exported_node_runs_on_onnxruntime_with_reference_indices(name):
    view = synthetic_view(B=2, N=24, Q=3, seed=3)
    method = make_method(name)
    module = SelectOnly(method, keep=7)
    args = _inputs(view)
    model = _export(module, args)
    nodes = [n for n in model.graph.node if n.op_type == contract.OP_TYPE]
    assert len(nodes) == 1 and nodes[0].domain == "iwp"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["method"] == name.encode() and attrs["keep"] == 7
    register_schema()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 13  # what ONNX Runtime 1.31 reads
    ort_model = for_onnxruntime(model)
    assert {n.domain for n in ort_model.graph.node if n.op_type == contract.OP_TYPE} == {ORT_DOMAIN}
    assert nodes[0].domain == "iwp"  # the original is untouched
    sess = session(model)
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    (indices,) = sess.run(None, feeds)
    assert indices.tolist() == method.select(view, 7).tolist()


def test_onnxruntime_runs_through_the_compiled_kernel(monkeypatch):
    from iwp.plugins.visual_token_select import cpu
    calls = []
    original = cpu.select

    def counting(method, view, keep):
        calls.append(keep)
        return original(method, view, keep)
    monkeypatch.setattr(cpu, "select", counting)
    view = synthetic_view(B=2, N=30, Q=3, seed=5)
    method = make_method("iwp")
    model = _export(SelectOnly(method, keep=9), _inputs(view))
    sess = session(model)
    (indices,) = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), _inputs(view))})
    assert calls == [9]
    assert indices.tolist() == method.select(view, 9).tolist()
