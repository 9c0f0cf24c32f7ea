"""A LoRA fold equals peft's merge_and_unload() bit for bit, in float32 and bfloat16, case by case; and the
folded model computes what base+adapter computes at inference time."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from helpers.lora_oracle import assert_same_tensors, gpt2, llama, logits, make_adapter, peft_merge, save_base  # noqa: E402
from helpers.models import read_folder  # noqa: E402

from mergekit_lite import fold_lora  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# name: (base, LoraConfig fields, tied_embeddings)
CASES = {
    "plain": ("llama", dict(r=8, lora_alpha=16, target_modules=PROJ), "untie"),
    "rslora_patterns": ("llama", dict(r=8, lora_alpha=16, use_rslora=True,
                                      target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                      rank_pattern={"q_proj": 4, "^model.layers.1.mlp.down_proj": 2},
                                      alpha_pattern={"v_proj": 3, "layers.0.mlp.up_proj": 40}), "untie"),
    "embedding_and_lm_head": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
                              "untie"),
    "dora_linear_and_embedding": ("llama", dict(r=4, lora_alpha=8, use_dora=True,
                                                target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
                                  "untie"),
    "lora_bias": ("llama", dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "k_proj", "o_proj"]),
                  "untie"),
    "bias_all_and_modules_to_save": ("llama", dict(r=4, lora_alpha=8, bias="all", modules_to_save=["lm_head"],
                                                   target_modules=["q_proj", "v_proj"]), "untie"),
    "bias_lora_only": ("llama", dict(r=4, lora_alpha=8, bias="lora_only", target_modules=["q_proj", "o_proj"]),
                       "untie"),
    # GPT-2's Conv1D layers (attn.c_proj is square: only the layer type tells it is transposed). With lm_head
    # (an nn.Linear) targeted too, peft saves fan_in_fan_out: false although c_attn & co were merged transposed.
    "gpt2_conv1d_and_lm_head": ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True,
                                             target_modules=["c_attn", "c_proj", "c_fc", "lm_head"]), "shared"),
    "gpt2_dora": ("gpt2", dict(r=4, lora_alpha=8, use_dora=True, fan_in_fan_out=True,
                               target_modules=["c_attn", "c_proj", "c_fc"]), "untie"),
    # Tied embeddings, reproducing peft's single shared tensor (the default unties; see the logits tests).
    "tied_lm_head_shared": ("llama_tied", dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]), "shared"),
    "tied_embedding_shared": ("llama_tied", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"]),
                              "shared"),
    "tied_ensure_weight_tying": ("llama_tied", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"],
                                                    ensure_weight_tying=True), "shared"),
    # A trained lm_head on a tied base is its own tensor in peft too (and config says untied).
    "tied_modules_to_save": ("llama_tied", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                modules_to_save=["lm_head"]), "untie"),
}
MODELS = {"llama": lambda: llama(attention_bias=True), "llama_tied": lambda: llama(tied=True), "gpt2": gpt2}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Each base model once, and its checkpoint in float32 and bfloat16 (several shards each)."""
    root = tmp_path_factory.mktemp("peft_bases")
    models = {name: build() for name, build in MODELS.items()}
    folders = {(name, dt): save_base(model, root / f"{name}-{dt}", DTYPES[dt])
               for name, model in models.items() for dt in DTYPES}
    return models, folders


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    """One adapter per case, made once (lazily) and shared by both dtypes."""
    models, _ = bases
    root = tmp_path_factory.mktemp("peft_adapters")
    made = {}

    def get(case: str):
        if case not in made:
            model, config, _ = CASES[case]
            made[case] = make_adapter(models[model], root / case, seed=len(made) + 1, **config)
        return made[case]

    return get


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_fold_equals_peft_merge_and_unload(case, dtype, bases, adapters, tmp_path):
    _, folders = bases
    model, _, tied = CASES[case]
    base_dir, adapter = folders[(model, dtype)], adapters(case)
    expected, expected_config = peft_merge(base_dir, [adapter], DTYPES[dtype], tmp_path / "peft")
    # strict (the default): a failed validation raises, and a "shared" fold, which computes something else
    # than base+adapter at inference on purpose, must not fail it
    result = fold_lora(base_dir, adapter, tmp_path / "ours", tied_embeddings=tied, max_shard_size="40kB",
                       progress=False)
    assert result.validation.status == "passed"
    got = read_folder(tmp_path / "ours")
    assert_same_tensors(got, expected, read_folder(base_dir))
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config.get("tie_word_embeddings") == expected_config.get("tie_word_embeddings")


def test_adapter_saved_in_bfloat16(bases, tmp_path):
    """An adapter saved in bf16 (autocast_adapter_dtype=False) is upcast exactly, as peft does on load."""
    models, folders = bases
    adapter = make_adapter(copy.deepcopy(models["llama"]).to(torch.bfloat16), tmp_path / "bf16",
                           autocast_adapter_dtype=False, r=8, lora_alpha=16,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    for dt in DTYPES:
        expected, _ = peft_merge(folders[("llama", dt)], [adapter], DTYPES[dt], tmp_path / f"peft-{dt}")
        fold_lora(folders[("llama", dt)], adapter, tmp_path / f"ours-{dt}", progress=False)
        assert_same_tensors(read_folder(tmp_path / f"ours-{dt}"), expected, read_folder(folders[("llama", dt)]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_adapters_equal_peft_with_both_active(dtype, bases, tmp_path):
    """Plain r=8 and rsLoRA r=4 overlapping on v_proj: folded in order, as peft merges both active adapters."""
    models, folders = bases
    first = make_adapter(models["llama"], tmp_path / "a", seed=11, r=8, lora_alpha=16,
                         target_modules=["q_proj", "v_proj", "embed_tokens"])
    second = make_adapter(models["llama"], tmp_path / "b", seed=12, r=4, lora_alpha=8, use_rslora=True,
                          target_modules=["v_proj", "down_proj", "embed_tokens"])
    base_dir = folders[("llama", dtype)]
    expected, _ = peft_merge(base_dir, [first, second], DTYPES[dtype], tmp_path / "peft")
    fold_lora(base_dir, [first, second], tmp_path / "ours", progress=False)
    assert_same_tensors(read_folder(tmp_path / "ours"), expected, read_folder(base_dir))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_adapters_equal_peft_scaled(dtype, bases, tmp_path):
    """--weight w multiplies the adapter's scaling, as peft's scale_layer does (DoRA included)."""
    models, folders = bases
    first = make_adapter(models["llama"], tmp_path / "a", seed=21, r=8, lora_alpha=16,
                         target_modules=["k_proj", "o_proj", "up_proj", "down_proj", "lm_head"])
    second = make_adapter(models["llama"], tmp_path / "b", seed=22, r=4, lora_alpha=8, use_dora=True,
                          target_modules=["q_proj", "v_proj", "embed_tokens"])
    base_dir = folders[("llama", dtype)]
    expected, _ = peft_merge(base_dir, [first, second], DTYPES[dtype], tmp_path / "peft", weights=[0.7, -0.3])
    fold_lora(base_dir, [first, second], tmp_path / "ours", weights=[0.7, -0.3], progress=False)
    assert_same_tensors(read_folder(tmp_path / "ours"), expected, read_folder(base_dir))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dora_after_another_adapter_within_one_ulp(dtype, bases, tmp_path):
    """DoRA takes its norm from the module's weight without the adapters merged before it. We use the base
    weight as read; peft 0.21.2 recovers it by unmerging the earlier adapters (W - delta, rounded) and merges
    them again, which can move a value by one ulp. So this case agrees to one ulp, not bit for bit."""
    models, folders = bases
    first = make_adapter(models["llama"], tmp_path / "a", seed=41, r=8, lora_alpha=16, target_modules=["q_proj"])
    second = make_adapter(models["llama"], tmp_path / "b", seed=42, r=4, lora_alpha=8, use_dora=True,
                          target_modules=["q_proj"])
    base_dir = folders[("llama", dtype)]
    expected, _ = peft_merge(base_dir, [first, second], DTYPES[dtype], tmp_path / "peft")
    fold_lora(base_dir, [first, second], tmp_path / "ours", progress=False)
    got = read_folder(tmp_path / "ours")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():   # one ulp at the tensor's scale (the largest power of 2 below max|x|)
        largest = tensor.abs().max().item()
        ulp = torch.finfo(tensor.dtype).eps * 2.0 ** math.floor(math.log2(largest)) if largest else 0.0
        assert (got[name].double() - tensor.double()).abs().max().item() <= ulp, name
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           read_folder(base_dir)["model.layers.0.self_attn.q_proj.weight"])


def test_folded_logits_equal_base_plus_adapter_at_inference(bases, adapters, tmp_path):
    """Load-time (folded) and inference-time (peft, unmerged) give the same outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, folders = bases
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for case in ("dora_linear_and_embedding", "rslora_patterns", "bias_all_and_modules_to_save"):
        base_dir = folders[("llama", "float32")]
        fold_lora(base_dir, adapters(case), tmp_path / case, progress=False)
        unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapters(case))
        expected, got = logits(unmerged, tokens), logits(tmp_path / case, tokens)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_tied_embeddings_untie_keeps_what_base_plus_adapter_computes(bases, tmp_path):
    """A tied GPT-2 with LoRA on both wte and lm_head: untie (default) writes lm_head and computes what the
    unmerged peft model computes; shared (peft's merge) folds both deltas into wte and does not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models, folders = bases
    adapter = make_adapter(models["gpt2"], tmp_path / "adapter", seed=31, r=4, lora_alpha=8,
                           target_modules=["wte", "lm_head", "c_attn"])
    base_dir = folders[("gpt2", "float32")]
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter), tokens)

    result = fold_lora(base_dir, adapter, tmp_path / "untied", progress=False)
    assert "lm_head.weight" in read_folder(tmp_path / "untied")
    assert json.loads((tmp_path / "untied" / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight is written separately" in (tmp_path / "untied" / "README.md").read_text()
    assert any("tie_word_embeddings: false" in w for w in result.warnings)
    torch.testing.assert_close(logits(tmp_path / "untied", tokens), expected, rtol=1e-4, atol=1e-4)

    shared = fold_lora(base_dir, adapter, tmp_path / "shared", tied_embeddings="shared", progress=False)
    assert shared.validation.status == "passed"   # a chosen change of behaviour is no failed merge
    assert "lm_head.weight" not in read_folder(tmp_path / "shared")
    assert (logits(tmp_path / "shared", tokens) - expected).abs().max() > 0.1


def test_demo_adapter_written_without_peft_is_what_peft_reads(tmp_path):
    """The synthetic adapters (demo/adapters) are real PEFT adapters: peft folds them to the same tensors."""
    from transformers import LlamaForCausalLM

    from mergekit_lite.testing.adapters import DEMO_ADAPTERS, write_adapter
    from mergekit_lite.testing.synthetic import LlamaShape, write_model

    shape = LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=128)
    base_dir = write_model(str(tmp_path / "base"), shape, dtype=torch.bfloat16, max_shard_size=40_000)
    for name in ("code", "style"):   # rsLoRA on every projection; DoRA
        adapter = write_adapter(str(tmp_path / name), shape, DEMO_ADAPTERS[name], seed=3, base_model=base_dir)
        expected, _ = peft_merge(tmp_path / "base", [tmp_path / name], torch.bfloat16, tmp_path / f"peft-{name}",
                                 model_class=LlamaForCausalLM)
        fold_lora(base_dir, adapter, tmp_path / f"ours-{name}", progress=False)
        assert_same_tensors(read_folder(tmp_path / f"ours-{name}"), expected, read_folder(base_dir))


@pytest.mark.parametrize("dtype", DTYPES)
def test_resized_vocabulary(dtype, bases, tmp_path):
    """An adapter trained after resize_token_embeddings stores the resized embeddings; they replace the base's
    (before the embedding LoRA is added) and config.json gets the new vocab_size."""
    models, folders = bases
    resized = copy.deepcopy(models["llama"])
    resized.resize_token_embeddings(136, mean_resizing=False)
    adapter = make_adapter(resized, tmp_path / "adapter", seed=51, r=4, lora_alpha=8,
                           target_modules=["embed_tokens", "lm_head", "q_proj"])
    base_dir = folders[("llama", dtype)]
    expected, expected_config = peft_merge(base_dir, [adapter], DTYPES[dtype], tmp_path / "peft",
                                           prepare=lambda m: m.resize_token_embeddings(136, mean_resizing=False))
    fold_lora(base_dir, adapter, tmp_path / "ours", progress=False)
    got = read_folder(tmp_path / "ours")
    assert got["model.embed_tokens.weight"].shape == (136, 64)
    assert_same_tensors(got, expected, read_folder(base_dir))
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == 136
    assert expected_config["vocab_size"] == 136
    assert "The adapter resized the vocabulary to 136 tokens." in (tmp_path / "ours" / "README.md").read_text()


@pytest.mark.parametrize("dtype", DTYPES)
def test_mica_rounds_the_delta_first(dtype, bases, tmp_path):
    """MiCA adapters merge like embeddings: the delta is rounded to the weight's dtype, then added."""
    models, folders = bases

    def train_a(peft_model):   # MiCA trains only A, which starts at zero
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn_like(param))

    adapter = make_adapter(models["llama"], tmp_path / "adapter", seed=61, perturb=train_a, r=4, lora_alpha=8,
                           target_modules=["q_proj", "up_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "mica"}))
    base_dir = folders[("llama", dtype)]
    expected, _ = peft_merge(base_dir, [adapter], DTYPES[dtype], tmp_path / "peft")
    fold_lora(base_dir, adapter, tmp_path / "ours", progress=False)
    assert_same_tensors(read_folder(tmp_path / "ours"), expected, read_folder(base_dir))


class ConvNet(torch.nn.Module):
    """Conv2d 1x1 and 3x3 and a Linear: the conv fold (not in LLMs, but peft supports it)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 1)
        self.conv3 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_layers(dtype, dora, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    from mergekit_lite.api.fold import fold_lora as fold

    torch.manual_seed(0)
    net = ConvNet()
    (tmp_path / "base").mkdir()
    save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in net.state_dict().items()},
              str(tmp_path / "base" / "model.safetensors"))
    adapter = make_adapter(net, tmp_path / "adapter", seed=71, r=2, lora_alpha=4, use_dora=dora,
                           target_modules=["conv1", "conv3", "head"])
    model = ConvNet().to(DTYPES[dtype])
    model.load_state_dict(load_file(str(tmp_path / "base" / "model.safetensors")))
    expected = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    got = fold(tmp_path / "base", adapter)
    assert_same_tensors(got, expected, load_file(str(tmp_path / "base" / "model.safetensors")))
