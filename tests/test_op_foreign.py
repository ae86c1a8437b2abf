"""How other frameworks' configs name ops lives in the ops (`OpDef.foreign`): the
importers and export-hf look the ops up by their role there."""

from __future__ import annotations

from forgec.compiler.importers import kf
from forgec.compiler.ops import OPS, foreign_choices, foreign_default, foreign_op


def test_kempnerforge_choices_name_the_ops_of_their_role():
    assert foreign_choices("kf", "norm", "norm_type") == {"rmsnorm": "rmsnorm",
                                                          "layernorm": "layernorm"}
    assert foreign_choices("kf", "mlp", "activation") == {"silu": "swiglu", "gelu": "gelu_mlp",
                                                          "relu": "relu_mlp"}
    assert foreign_choices("kf", "router", "moe_router") == {"softmax_topk": "softmax_topk",
                                                             "sigmoid_topk": "sigmoid_topk"}
    # KempnerForge's ModelConfig defaults
    assert (kf.DEFAULTS["norm_type"], kf.DEFAULTS["activation"], kf.DEFAULTS["moe_router"]) \
        == ("rmsnorm", "silu", "softmax_topk")
    assert foreign_default("kf", "router", "moe_router") == "softmax_topk"


def test_hugging_face_ops_by_role():
    assert [foreign_op("hf", r) for r in ("token_embedding", "positions", "self_attention",
                                          "norm", "router", "output_head")] \
        == ["embedding", "rope", "attention", "rmsnorm", "softmax_topk", "lm_head"]
    assert foreign_op("hf", "mlp", hidden_act="swish") == "swiglu"
    assert foreign_op("hf", "experts", hidden_act="silu") == "moe"
    assert foreign_op("hf", "mlp", hidden_act="gelu") is None  # nothing expresses it


def test_a_router_writes_its_own_arguments():
    note = lambda key: key + " (default)"  # noqa: E731
    config = {"moe_aux_loss_weight": 0.02, "moe_bias_schedule": "cosine_decay",
              "moe_sequence_aux_loss_weight": 0.0}
    assert OPS["softmax_topk"].foreign["kf"].args(config, note) == [
        ("renormalize", True, None), ("aux_loss_weight", 0.02, "moe_aux_loss_weight (default)")]
    assert OPS["sigmoid_topk"].foreign["kf"].args(config, note) == [
        ("schedule", "cosine_decay", None)]
    config["moe_sequence_aux_loss_weight"] = 0.1
    assert OPS["sigmoid_topk"].foreign["kf"].args(config, note)[1] == \
        ("seq_aux_loss_weight", 0.1, None)
