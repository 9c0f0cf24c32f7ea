"""The forward check runs models layer by layer (validation/streamed.py): the same logits as transformers' own
whole-model loading, one module's weights in memory at a time, and no look at free memory."""

from __future__ import annotations

import builtins
import io
import os
from collections import defaultdict

import pytest
import torch

from mergekit_lite.testing.adapters import AdapterShape, write_adapter
from mergekit_lite.testing.synthetic import LlamaShape, write_model

pytest.importorskip("transformers")
pytest.importorskip("peft")

CPU = torch.device("cpu")
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def transformers_model(folder, family: str, tied: bool, dtype: torch.dtype) -> str:
    """A tiny random model of ``family`` saved by transformers itself, in several shards."""
    import transformers

    config = getattr(transformers, f"{family}Config")(**SMALL, tie_word_embeddings=tied)
    torch.manual_seed(len(family) + tied)
    model = getattr(transformers, f"{family}ForCausalLM")(config).to(dtype)
    with torch.no_grad():   # Qwen2's q/k/v biases start at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(folder, max_shard_size="40KB")
    return str(folder)


def both(folder: str, adapters=()):
    """(whole-model logits by transformers' from_pretrained, layer-by-layer logits, the streamed model)."""
    from mergekit_lite.validation.inference import _config_of, load_model, logits_of, make_batch
    from mergekit_lite.validation.streamed import open_model

    batch = make_batch(folder, _config_of(folder)["vocab_size"])
    whole = logits_of(load_model(folder, CPU, adapters), batch, CPU)
    streamed = open_model(folder, CPU, adapters)
    assert hasattr(streamed, "streaming"), "the model was loaded whole, not streamed"
    return whole, logits_of(streamed, batch, CPU), streamed


def module_bytes(folder: str) -> tuple[dict[str, int], int]:
    """(float32 bytes of each module's own tensors, number of tensors), from the safetensors headers."""
    from mergekit_lite.sources.opener import open_checkpoint

    checkpoint = open_checkpoint(folder)
    checkpoint.close()
    sizes: dict[str, int] = defaultdict(int)
    for name, info in checkpoint.tensors.items():
        sizes[name.rsplit(".", 1)[0]] += 4 * info.numel
    return sizes, len(checkpoint.tensors)


def _tensor_names(folder: str) -> list[str]:
    from mergekit_lite.sources.opener import open_checkpoint

    checkpoint = open_checkpoint(folder)
    checkpoint.close()
    return list(checkpoint.tensors)


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Mistral"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_layer_by_layer_logits_equal_transformers(family, tied, tmp_path):
    folder = transformers_model(tmp_path / "m", family, tied, torch.bfloat16)
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) >= 2
    whole, streamed, model = both(folder)
    assert whole.abs().max() > 0.1
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-6)   # observed: bit-identical
    # memory: one module's weights at a time, all freed afterwards
    sizes, tensors = module_bytes(folder)
    assert model.streaming.live == 0
    assert model.streaming.peak == max(sizes.values())
    # every tensor read once; a tied lm_head reads the embedding's tensor a second time
    assert model.streaming.reads == tensors + (1 if tied else 0)
    assert all(p.device.type == "meta" for p in model.parameters())   # nothing left loaded
    # layers reuse each other's weight buffers (streamed.Recycled), emptied when the pass ends: a second pass
    # allocates again (nothing was held in between), no more than two layers' worth, and computes the same logits
    from mergekit_lite.validation.inference import _config_of, logits_of, make_batch

    first = model.streaming.allocated
    per_layer = sum(1 for name in _tensor_names(folder) if ".layers.0." in name)
    assert 0 < first <= 2 * per_layer
    again = logits_of(model, make_batch(folder, _config_of(folder)["vocab_size"]), CPU)
    assert torch.equal(again, streamed) and 0 < model.streaming.allocated - first <= 2 * per_layer


def test_weight_buffers_do_not_grow_with_the_layers(tmp_path):
    """Each layer's float32 weights reuse the buffers an earlier layer freed (a fresh buffer costs a page fault
    per 4 KiB): 8 layers allocate no more than two layers' weights (the running one and the one read ahead) for
    8 x 9 + 3 reads, and the logits equal transformers' on the whole model."""
    import transformers

    config = transformers.LlamaConfig(**{**SMALL, "num_hidden_layers": 8}, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "m", max_shard_size="40KB")
    whole, streamed, model = both(str(tmp_path / "m"))
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-6)
    names = _tensor_names(str(tmp_path / "m"))
    per_layer = sum(1 for name in names if ".layers.0." in name)
    assert model.streaming.reads == len(names) == 8 * per_layer + 3
    assert 0 < model.streaming.allocated <= 2 * per_layer   # the embedding, norm and lm_head are read as before


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_base_with_adapters_equals_peft_on_the_whole_model(tied, tmp_path):
    """Adapters applied at inference time (the reference of a LoRA fold): peft's unmerged LoRA and DoRA layers over
    streamed base weights give peft's logits over the whole model."""
    shape = LlamaShape(tied=tied)
    base = write_model(str(tmp_path / "base"), shape, dtype=torch.bfloat16, seed=1, max_shard_size=60_000)
    plain = write_adapter(str(tmp_path / "lora"), shape, AdapterShape(("q_proj", "v_proj", "down_proj")), seed=3)
    dora = write_adapter(str(tmp_path / "dora"), shape, AdapterShape(("q_proj", "o_proj"), r=4, lora_alpha=8,
                                                                     use_dora=True), seed=4)
    adapters = [(plain, 0.7), (dora, 1.0)]
    whole, streamed, model = both(base, adapters)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-6)
    without, _, _ = both(base)
    assert (whole - without).abs().max() > 1e-2   # the adapters do change the logits
    assert model.streaming.peak == max(module_bytes(base)[0].values())   # adapter weights are small and stay
    adapter_weights = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapter_weights and all(p.device.type == "cpu" for p in adapter_weights)


def test_validation_never_reads_free_memory(tmp_path, monkeypatch):
    """Memory is budgeted from the tensors: with 1 MB reported free everywhere, the forward check still runs."""
    from mergekit_lite import run_merge, validate

    shape = LlamaShape()
    for name, seed in (("a", 1), ("b", 2)):
        write_model(str(tmp_path / name), shape, dtype=torch.bfloat16, seed=1, delta_seed=seed, max_shard_size=60_000)
    spec = (f"merge_method: linear\nmodels:\n  - model: {tmp_path}/a\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {tmp_path}/b\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n")
    run_merge(spec, str(tmp_path / "out"), progress=False, validate=False)

    psutil = pytest.importorskip("psutil")
    tiny = 1 << 20

    class Free:
        total = available = free = tiny

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Free())
    sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 256, "SC_PHYS_PAGES": 256}.get(name)
                        or sysconf(name))
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            return io.StringIO("MemTotal: 1024 kB\nMemFree: 1024 kB\nMemAvailable: 1024 kB\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    forward = validate(tmp_path / "out", device="cpu").check("forward")
    assert forward.status == "passed", forward.summary
    assert [entry["loss"] is not None for entry in forward.numbers["inputs"]] == [True, True]


def test_a_missing_tensor_is_named(tmp_path):
    """A tensor the skeleton needs and the files lack fails the check by name, as transformers' loading did."""
    from safetensors.torch import load_file, save_file

    from mergekit_lite.validation.inference import IncompleteModel
    from mergekit_lite.validation.streamed import open_model

    folder = write_model(str(tmp_path / "m"), LlamaShape(), dtype=torch.float32)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with pytest.raises(IncompleteModel) as caught:
        open_model(folder, CPU)
    assert caught.value.tensor == "model.layers.1.mlp.up_proj.weight"


def _gpt_neox(folder) -> str:
    """GPT-NeoX, untied: stored as ``embed_out.weight``, which transformers 5 loads into ``lm_head``."""
    import transformers

    config = transformers.GPTNeoXConfig(**{k: v for k, v in SMALL.items() if k != "num_key_value_heads"},
                                        tie_word_embeddings=False)
    torch.manual_seed(5)
    transformers.GPTNeoXForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="40KB")
    return str(folder)


def _llava(folder) -> str:
    """LLaVA in the legacy layout (``language_model.model.*``), as transformers 5 still saves it."""
    from helpers.vlm_models import write_llava

    return str(write_llava(folder, 3, legacy=True))


def _gemma3(folder) -> str:
    """Gemma 3 with its vision tower, saved by transformers (``language_model.model.*``, the Hub's layout)."""
    import transformers

    text = transformers.Gemma3TextConfig(**{**SMALL, "vocab_size": 300}, head_dim=16, sliding_window=16)
    vision = transformers.SiglipVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, hidden_size=32,
                                             intermediate_size=64, num_attention_heads=2)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(6)
    model = transformers.Gemma3ForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="60KB")
    return str(folder)


def _stored(folder: str) -> dict:
    from mergekit_lite.sources.opener import open_checkpoint

    checkpoint = open_checkpoint(folder)
    checkpoint.close()
    return checkpoint.tensors


def _streams_as_transformers_loads(folder: str):
    """The model streamed, after asserting that its logits equal transformers' whole-model loading."""
    from mergekit_lite.validation.inference import _config_of, load_model, logits_of, make_batch
    from mergekit_lite.validation.streamed import open_model

    config = _config_of(folder)
    batch = make_batch(folder, config.get("text_config", config)["vocab_size"])
    whole = logits_of(load_model(folder, CPU), batch, CPU)
    model = open_model(folder, CPU)
    assert hasattr(model, "streaming"), "the model was loaded whole, not streamed"
    assert torch.equal(logits_of(model, batch, CPU), whole) and whole.abs().max() > 0.1
    assert model.streaming.live == 0 and 0 < model.streaming.reads <= len(_stored(folder))   # text only: no vision
    return model


def _qwen25_vl(folder) -> str:
    """Qwen2.5-VL as the Hub stores it (``model.layers.*``, ``visual.*``; loaded as ``model.language_model.*``)."""
    import transformers

    text = dict(SMALL, vocab_size=300, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1])
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=299,
                                           video_token_id=298, vision_start_token_id=297)
    torch.manual_seed(8)
    transformers.Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(
        folder, max_shard_size="60KB")
    return str(folder)


@pytest.mark.parametrize("build", [_gpt_neox, _llava, _gemma3, _qwen25_vl],
                         ids=["gpt_neox", "llava", "gemma3", "qwen2.5-vl"])
def test_renamed_layouts_stream(build, tmp_path, monkeypatch):
    """Checkpoints whose stored names transformers renames while loading stream under its names, with the logits
    of its whole-model loading; without the renames they could not stream (they loaded whole, and a large one
    was not checked)."""
    from mergekit_lite.validation import renames, streamed

    folder = build(tmp_path / "m")
    stored = _stored(folder)
    renamed = renames.loaded_names(streamed._skeleton(folder), stored)
    assert renamed and set(renamed.values()) <= set(stored) and not set(renamed) & set(stored)
    _streams_as_transformers_loads(folder)
    monkeypatch.setattr(streamed, "loaded_names", lambda *args: {})
    assert streamed.streamed_model(folder, CPU) is None


MOE = {"Mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
       "Qwen3Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])   # f32: read in place
@pytest.mark.parametrize("family", list(MOE))
def test_stacked_experts_stream(family, dtype, tmp_path, monkeypatch):
    """A mixture of experts stored one tensor per expert (``experts.3.w1.weight``; transformers 5 stacks them into
    ``experts.gate_up_proj`` while loading) streams too: each layer's experts are stacked by transformers' own
    operations when the layer runs, with the logits of whole-model loading. Memory: the largest module's
    parameters in float32. A stack above the merge's bound is read one expert at a time (below); only an expert
    above it makes the model load whole, which needs more still, so it is not checked (TooLargeWhole), never
    loaded beyond the bound."""
    import transformers

    from mergekit_lite.validation import streamed
    from mergekit_lite.validation.renames import Fused

    config = getattr(transformers, f"{family}Config")(**SMALL, **MOE[family])
    torch.manual_seed(7)
    getattr(transformers, f"{family}ForCausalLM")(config).to(dtype).save_pretrained(
        tmp_path / "m", max_shard_size="40KB")
    folder = str(tmp_path / "m")
    stored = _stored(folder)
    fused = {name: source for name, source in streamed.loaded_names(streamed._skeleton(folder), stored).items()
             if isinstance(source, Fused)}
    # per layer: gate_up from 2 x 4 experts, down from 4
    assert sorted(len(source.names) for source in fused.values()) == [4, 4, 8, 8]
    model = _streams_as_transformers_loads(folder)
    from mergekit_lite.validation.inference import logits_of, make_batch

    batch = make_batch(folder, SMALL["vocab_size"])   # a second pass, into the first one's freed stacks
    assert torch.equal(logits_of(model, batch, CPU), logits_of(model, batch, CPU))
    stack = 4 * 4 * 3 * SMALL["hidden_size"] * (config.moe_intermediate_size if family == "Qwen3Moe"
                                                 else SMALL["intermediate_size"])   # float32 gate, up, down
    assert model.streaming.peak == max(stack, 4 * SMALL["vocab_size"] * SMALL["hidden_size"])
    # the layer's experts (each stored tensor is read into its place in the stack)
    monkeypatch.setattr(streamed, "reads_ahead", lambda device: False)
    assert _by_expert(streamed.streamed_model(folder, CPU, limit=stack)) == 0
    assert _by_expert(streamed.streamed_model(folder, CPU, limit=stack - 1)) == 4   # gate_up and down, 2 layers
    monkeypatch.setattr(streamed, "reads_ahead", lambda device: True)   # and the next layer's, read meanwhile
    ahead = streamed.streamed_model(folder, CPU, limit=2 * stack)
    assert _by_expert(ahead) == 0 and _by_expert(streamed.streamed_model(folder, CPU, limit=2 * stack - 1)) == 4
    assert torch.equal(logits_of(ahead, batch, CPU), logits_of(model, batch, CPU))   # stacks built on the reader
    expert = stack // 4   # one expert's slices: its gate and up projections, and its down projection
    assert streamed.streamed_model(folder, CPU, limit=expert) is not None
    assert streamed.streamed_model(folder, CPU, limit=expert - 1) is None
    with pytest.raises(streamed.TooLargeWhole):
        streamed.open_model(folder, CPU, whole_limit=expert - 1)


def _by_expert(model) -> int:
    """How many of the model's parameters are stacks read one expert at a time (experts.LazyExperts)."""
    from mergekit_lite.validation.experts import LazyExperts

    return sum(isinstance(param, LazyExperts) for param in model.parameters())


def test_a_stack_placed_otherwise_than_transformers_is_refused(tmp_path, monkeypatch):
    """Each rule's placement is checked against transformers' own operations on small stand-ins before a model
    streams: a placement that put the up projections before the gate ones would not be used (the model loads
    whole instead)."""
    import transformers

    from mergekit_lite.validation import renames, streamed

    config = transformers.MixtralConfig(**SMALL, **MOE["Mixtral"])
    torch.manual_seed(9)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "m", max_shard_size="40KB")
    folder = str(tmp_path / "m")
    assert streamed.streamed_model(folder, CPU) is not None
    place = renames._place

    def reversed_place(node, view, placed):
        if node[0] == "cat":
            node = (node[0], node[1], node[2][::-1])
        place(node, view, placed)

    monkeypatch.setattr(renames, "_place", reversed_place)
    assert streamed.streamed_model(folder, CPU) is None


def test_rules_transformers_cannot_apply_leave_the_model_whole(tmp_path, monkeypatch):
    """transformers' loading functions are internals: when they fail (another version, a rule that does not fit
    this model), nothing is renamed and the model loads whole, as it did before renames were read."""
    import transformers.core_model_loading as loading

    from mergekit_lite.validation import renames, streamed

    folder = _llava(tmp_path / "m")
    assert streamed.streamed_model(folder, CPU) is not None

    def changed(*args, **kwargs):
        raise TypeError("rename_source_key() got an unexpected keyword argument")

    monkeypatch.setattr(loading, "rename_source_key", changed)
    assert renames.loaded_names(streamed._skeleton(folder), _stored(folder)) == {}
    assert streamed.streamed_model(folder, CPU) is None   # open_model then loads it whole


def _wide_moe(family: str, dtype: torch.dtype, folder) -> tuple[str, int, int]:
    """(a tiny MoE stored one tensor per expert whose expert slice is larger than its other tensors in float32,
    its layer's stack in float32 bytes, its largest expert slice in float32 bytes)."""
    import transformers

    wide = dict(MOE[family], **({"moe_intermediate_size": 192} if family == "Qwen3Moe" else {}))
    config = getattr(transformers, f"{family}Config")(**dict(SMALL, intermediate_size=192), **wide)
    torch.manual_seed(11)
    getattr(transformers, f"{family}ForCausalLM")(config).to(dtype).save_pretrained(folder, max_shard_size="60KB")
    gate_up = 4 * 2 * 192 * SMALL["hidden_size"]   # one expert's gate and up projections, float32 bytes
    return str(folder), 4 * gate_up * 3 // 2, gate_up


@pytest.mark.parametrize("ahead", [False, True], ids=["inline", "read-ahead"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("family", list(MOE))
def test_stacks_above_the_bound_are_read_one_expert_at_a_time(family, dtype, ahead, tmp_path, monkeypatch):
    """A layer's experts above the merge's bound (two Mixtral 8x7B: 5.6 GB a layer in float32, bound 2.4 GB) are
    no longer NOT CHECKED: transformers' own loop over experts takes one expert's slice at a time, and each slice
    is read then, from its stored tensors. Logits: those of transformers' whole-model loading with the same loop
    (its ``eager`` experts implementation), bit for bit; memory: one slice, the pass's peak here. With a reader
    thread (a GPU, or spare cores) the other modules are read ahead on it while the slices are read beside it."""
    from mergekit_lite.validation import streamed
    from mergekit_lite.validation.finite import FiniteTally
    from mergekit_lite.validation.inference import load_model, logits_of, make_batch

    from mergekit_lite.validation import experts

    folder, stack, expert = _wide_moe(family, dtype, tmp_path / "m")
    monkeypatch.setattr(streamed, "reads_ahead", lambda device: ahead)
    pools, pool_class = [], experts.SlicePool
    monkeypatch.setattr(experts, "SlicePool", lambda: pools.append(pool_class()) or pools[-1])
    tally = FiniteTally()
    model = streamed.streamed_model(folder, CPU, limit=(2 if ahead else 1) * stack - 1, tally=tally)
    seen, fill = [], streamed.fill_weight   # the slices' map when the final norm and lm_head are read: given back

    def spy(checkpoint, name, *args):
        if name in ("model.norm.weight", "lm_head.weight"):
            seen.append(pools[0]._map)
        return fill(checkpoint, name, *args)

    monkeypatch.setattr(streamed, "fill_weight", spy)
    assert _by_expert(model) == 4 and model.config._experts_implementation == "eager"
    batch = make_batch(folder, SMALL["vocab_size"])
    whole = load_model(folder, CPU)
    default = logits_of(whole, batch, CPU)                     # transformers' default: grouped matrix products
    whole.set_experts_implementation("eager")
    eager = logits_of(whole, batch, CPU)
    logits = logits_of(model, batch, CPU)
    assert torch.equal(logits, eager) and eager.abs().max() > 0.1
    assert (logits - default).abs().max() <= 1e-4 * max(1.0, float(default.abs().max()))
    assert model.streaming.peak == expert and model.streaming.live == 0
    assert pools[0]._map is None and pools[0].reused > 0                       # given back after the pass too
    assert seen == [None, None] or ahead   # read ahead, they are read beside the last layer's experts, as before
    read = [name for name in tally.counts if ".experts." in name]
    assert read and all(tally.counts[name] == (0, 0, -1) for name in read)   # counted for the finite check
    assert torch.equal(logits_of(model, batch, CPU), logits)                   # a second pass reads them again


def test_a_model_using_the_whole_stack_is_not_checked(tmp_path, monkeypatch):
    """A model that uses a stack read one expert at a time otherwise (here transformers' grouped products, which
    take the whole stack) stops with ExpertsUnsupported, and the forward check says NOT CHECKED, with why: it
    neither fails a correct merge nor reads the stack past the bound."""
    import transformers

    from mergekit_lite import validate
    from mergekit_lite.validation import forward, streamed
    from mergekit_lite.validation.experts import ExpertsUnsupported
    from mergekit_lite.validation.inference import logits_of, make_batch

    folder, stack, _ = _wide_moe("Mixtral", torch.bfloat16, tmp_path / "m")
    monkeypatch.setattr(streamed, "reads_ahead", lambda device: False)
    monkeypatch.setattr(forward, "WHOLE_SLACK", 0)   # the bound: 3 x the largest tensor (the embedding) in float32
    assert validate(folder, device="cpu").check("forward").status == "passed"
    monkeypatch.setattr(transformers.PreTrainedModel, "set_experts_implementation", lambda self, name: None)
    model = streamed.streamed_model(folder, CPU, limit=stack - 1)
    with pytest.raises(ExpertsUnsupported):
        logits_of(model, make_batch(folder, SMALL["vocab_size"]), CPU)
    check = validate(folder, device="cpu").check("forward")
    assert check.status == "not_checked" and "one expert at a time" in check.summary, check.summary


def test_expert_slices_reuse_memory_only_when_nothing_holds_it():
    """An expert slice's memory goes to the next slice only once no tensor shares it: not while the slice, or any
    view of it (a Python one here; one inside torch counts the same), is alive. A smaller slice takes the first
    bytes of the larger one's map; after ``clear`` a slice still in use keeps its memory."""
    from mergekit_lite.validation.experts import SlicePool

    pool = SlicePool()
    first = pool.take(2 << 20)
    address = first.data_ptr()
    view = first.view(torch.float32)[10:20]
    del first
    held = pool.take(2 << 20)                              # the view still shares the first map
    assert held.data_ptr() != address
    del view
    assert pool.take(1 << 20).data_ptr() != held.data_ptr()   # the pool's map is now held's, and held is alive
    del held
    smaller = pool.take(1 << 20)                           # free now: its first bytes, no new pages
    reused = smaller.data_ptr()
    del smaller
    assert pool.take(2 << 20).data_ptr() == reused
    kept = pool.take(2 << 20)
    kept.fill_(7)
    pool.clear()                                           # before the embedding, lm_head, and between passes
    fresh = pool.take(2 << 20)
    fresh.fill_(3)
    assert fresh.data_ptr() != kept.data_ptr() and int(kept.min()) == int(kept.max()) == 7
