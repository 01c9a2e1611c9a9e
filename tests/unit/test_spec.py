from __future__ import annotations

import pytest

from cscompile.decode.spec import DecoderSpec, TensorInfo
from cscompile.errors import UserError


def _io(past_fmt: str, present_fmt: str, layers: int = 2, extra_in=()):
    ins = [
        TensorInfo("input_ids", ("b", "s"), "tensor(int64)"),
        TensorInfo("attention_mask", ("b", "t"), "tensor(int64)"),
    ]
    ins += [TensorInfo(n, ("b",), "tensor(int64)") for n in extra_in]
    outs = [TensorInfo("logits", ("b", "s", 10), "tensor(float)")]
    for i in range(layers):
        for kind in ("key", "value"):
            ins.append(TensorInfo(past_fmt.format(i=i, kind=kind), ("b", 2, "p", 8), "tensor(float)"))
            outs.append(TensorInfo(present_fmt.format(i=i, kind=kind), ("b", 2, "t", 8), "tensor(float)"))
    return ins, outs


@pytest.mark.parametrize(
    "past_fmt,present_fmt",
    [
        ("past_key_values.{i}.{kind}", "present.{i}.{kind}"),
        ("past_key_values.layers.{i}.{kind}s", "past_key_values.layers.{i}.{kind}s"),
        ("past.{i}.{kind}", "present.{i}.{kind}"),
        ("past_key_values.layers.{i}.{kind}s", "cache.layers.{i}.{kind}s"),  # transformers 5.24
    ],
)
def test_naming_conventions(past_fmt, present_fmt):
    spec = DecoderSpec.from_io(*_io(past_fmt, present_fmt, layers=3))
    assert spec.num_layers == 3
    assert spec.num_kv_heads == 2 and spec.head_dim == 8
    assert spec.past_inputs[2] == (past_fmt.format(i=2, kind="key"), past_fmt.format(i=2, kind="value"))
    assert spec.position_ids is None and spec.attention_mask == "attention_mask"


def test_no_kv_cache_is_rejected():
    ins = [TensorInfo("input_ids", ("b", "s"), "tensor(int64)")]
    outs = [TensorInfo("logits", ("b", "s", 10), "tensor(float)")]
    with pytest.raises(UserError, match="has no KV-cache inputs"):
        DecoderSpec.from_io(ins, outs)


def test_missing_input_ids_and_logits():
    ins, outs = _io("past_key_values.{i}.{kind}", "present.{i}.{kind}")
    with pytest.raises(UserError, match="no 'input_ids'"):
        DecoderSpec.from_io(ins[1:], outs)
    with pytest.raises(UserError, match="no 'logits' output"):
        DecoderSpec.from_io(ins, outs[1:])


def test_gap_in_layers_and_unknown_inputs():
    ins, outs = _io("past_key_values.{i}.{kind}", "present.{i}.{kind}", layers=3)
    del ins[4:6]  # layer 1 past
    with pytest.raises(UserError, match="consecutive layers"):
        DecoderSpec.from_io(ins, outs)
    ins, outs = _io("past_key_values.{i}.{kind}", "present.{i}.{kind}", extra_in=("token_type_ids",))
    with pytest.raises(UserError, match="unsupported extra inputs"):
        DecoderSpec.from_io(ins, outs)
