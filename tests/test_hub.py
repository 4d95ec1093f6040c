"""Hub ids are fetched file by file: small files first, each weight shard when the run first needs it.

The hub is unreachable here, so a fake hub serves a local model folder through
the huggingface_hub functions llmq calls (the file list, `hf_hub_download`,
`get_safetensors_metadata`), into a cache laid out as the hub client lays it
out, and records every download with the time and the decoder layer the run
had reached. The safetensors headers it serves are parsed from the files'
bytes here, independently of llmq's reader.
"""

import fnmatch
import json
import struct
import time

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

from llmq import loading, outdir, stream
from llmq.cli import main
from conftest import checkpoint_tensors, model_folder_with_text

REPO = "owner/tiny"


class FakeHub:
    def __init__(self, folder, cache, monkeypatch, fail=None):
        self.folder, self.snapshot = folder, cache / "snapshots" / "0123abcd"
        self.fail = fail  # a file name whose download raises, as a dropped connection does
        self.downloads = []  # (file name, time, layer being loaded or None before the layers)
        self.tokens = set()  # the tokens the calls were given
        self.revisions = []  # the revisions the calls named
        self.loaded = []
        monkeypatch.setattr(huggingface_hub, "list_repo_files", self.list_repo_files)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", self.get_safetensors_metadata)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(loading, "hub_unreachable", lambda: None)
        load = stream.LayerStreamer.load

        def recording_load(streamer, index):
            self.loaded.append(index)
            return load(streamer, index)

        monkeypatch.setattr(stream.LayerStreamer, "load", recording_load)

    def _check(self, repo_id):
        if repo_id != REPO:
            try:  # the hub client's HTTP library: httpx2 from huggingface_hub 2, httpx before
                from httpx2 import Request, Response
            except ImportError:
                from httpx import Request, Response

            url = f"https://huggingface.co/api/models/{repo_id}"
            raise huggingface_hub.errors.RepositoryNotFoundError(
                f"404 Client Error: Repository Not Found for url: {url}", response=Response(404, request=Request("GET", url)))

    def list_repo_files(self, repo_id, **kw):
        self._check(repo_id)
        self.tokens.add(kw.get("token"))
        self.revisions.append(kw.get("revision"))
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())

    def hf_hub_download(self, repo_id, filename, revision=None, **kw):
        self._check(repo_id)
        self.tokens.add(kw.get("token"))
        self.revisions.append(revision)
        assert revision in (None, self.snapshot.name, "v2")  # "v2": a tag naming this snapshot
        if filename == self.fail:
            raise huggingface_hub.errors.LocalEntryNotFoundError("Connection reset by peer")
        self.downloads.append((filename, time.monotonic(), self.loaded[-1] if self.loaded else None))
        target = self.snapshot / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((self.folder / filename).read_bytes())
        return str(target)

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, **kw):
        for name in self.list_repo_files(repo_id, revision=revision):
            if allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                self.hf_hub_download(repo_id, name, revision)
        return str(self.snapshot)

    def get_safetensors_metadata(self, repo_id, revision=None, **kw):
        self._check(repo_id)
        files = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            raw = path.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8:8 + n])
            header.pop("__metadata__", None)
            files[path.name] = SafetensorsFileMetadata(metadata={}, tensors={
                k: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
                for k, v in header.items()})
        weight_map = {k: name for name, fm in files.items() for k in fm.tensors}
        index = self.folder / "model.safetensors.index.json"
        meta = json.loads(index.read_text())["metadata"] if index.is_file() else None
        return SafetensorsRepoMetadata(metadata=meta, sharded=len(files) > 1, weight_map=weight_map,
                                       files_metadata=files)

    def shards(self):
        return [(name, t, at) for name, t, at in self.downloads if name.endswith(".safetensors")]


def _first_need(folder):
    """Shard -> None when it holds a tensor outside the decoder layers, else the first layer it holds."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    need = {}
    for key, name in weight_map.items():
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else None
        if name not in need:
            need[name] = layer
        elif need[name] is not None:
            need[name] = None if layer is None else min(need[name], layer)
    return need


def _assert_same(a, b):
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys() and any(k.endswith(".qweight") for k in ta)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def _common(text):
    return ["--method", "gptq", "--bits", "4", "--group-size", "32", "--dataset", str(text), "--nsamples", "4",
            "--seqlen", "16", "--seed", "1", "--quiet"]


def test_streamed_hub_run_fetches_each_shard_when_its_layers_are_reached(tmp_path, monkeypatch):
    src = tmp_path / "m"
    text = model_folder_with_text(src, "llama")
    need = _first_need(src)
    assert sorted(set(need.values()) - {None}) == [0, 1]  # some shards hold only one layer's tensors
    assert main(["quantize", str(src), str(tmp_path / "local"), "--stream", *_common(text)]) == 0

    hub = FakeHub(src, tmp_path / "cache", monkeypatch)
    t0 = time.monotonic()
    assert main(["quantize", REPO, str(tmp_path / "hub"), "--stream", *_common(text)]) == 0
    _assert_same(tmp_path / "local", tmp_path / "hub")
    assert (tmp_path / "hub" / "tokenizer.json").is_file()

    small = [name for name, _, _ in hub.downloads if not name.endswith(".safetensors")]
    assert small[0] == "config.json" and "model.safetensors.index.json" in small
    shards = hub.shards()
    assert sorted(name for name, _, _ in shards) == sorted(need)  # every shard, each once
    first_shard = min(t for _, t, _ in shards)
    assert all(t < first_shard for name, t, _ in hub.downloads if name in small)  # small files first
    assert hub.loaded == [0, 1]
    for name, t, at in shards:
        assert t > t0
        assert at == need[name], (name, at, need[name])  # outer shards before layer 0, layer shards when loaded
    # Layer 1's own shards arrive after every shard of layer 0.
    assert max(t for name, t, _ in shards if need[name] == 0) < min(t for name, t, _ in shards if need[name] == 1)


def test_rtn_from_the_hub_goes_shard_by_shard_and_equals_the_local_run(tmp_path, monkeypatch):
    src = tmp_path / "m"
    model_folder_with_text(src, "qwen3")
    args = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--quiet"]
    assert main(["quantize", str(src), str(tmp_path / "local"), *args]) == 0
    hub = FakeHub(src, tmp_path / "cache", monkeypatch)
    assert main(["quantize", REPO, str(tmp_path / "hub"), *args]) == 0
    _assert_same(tmp_path / "local", tmp_path / "hub")
    assert sorted(name for name, _, _ in hub.shards()) == sorted(_first_need(src))


def test_a_failed_shard_download_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    src = tmp_path / "m"
    text = model_folder_with_text(src, "llama")
    need = _first_need(src)
    late = sorted(name for name, layer in need.items() if layer == 1)[0]
    assert main(["quantize", str(src), str(tmp_path / "local"), "--stream", *_common(text)]) == 0
    capsys.readouterr()

    FakeHub(src, tmp_path / "cache", monkeypatch, fail=late)
    assert main(["quantize", REPO, str(tmp_path / "hub"), "--stream", *_common(text)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = [line for line in err if line.startswith("llmq: error:")]
    assert len(message) == 1 and f"download {late}" in message[0] and "--resume" in message[0], err
    assert not (tmp_path / "hub").exists() and len(list(tmp_path.glob(".hub.partial-*"))) == 1

    hub = FakeHub(src, tmp_path / "cache", monkeypatch)
    # The rerun, as from another process: the interrupted run's folder is stale now.
    monkeypatch.setattr(outdir, "pid_alive", lambda pid: False)
    assert main(["quantize", REPO, str(tmp_path / "hub"), "--stream", "--resume", *_common(text)]) == 0
    _assert_same(tmp_path / "local", tmp_path / "hub")
    assert hub.loaded == [1]  # layer 0 was kept from the interrupted run


def test_unknown_hub_model_is_one_line(tmp_path, monkeypatch, capsys):
    FakeHub(tmp_path, tmp_path / "cache", monkeypatch)
    assert main(["quantize", "owner/missing", str(tmp_path / "out"), "--method", "rtn", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmq: error: no model 'owner/missing' on the Hugging Face hub") and "\n" not in err
    assert "a private model needs a token" in err  # the hub answers a private model as a missing one


def test_a_refused_token_and_commands_that_read_folders_only_are_one_line(tmp_path, monkeypatch, capsys):
    hub = FakeHub(tmp_path, tmp_path / "cache", monkeypatch)

    def refused(repo_id, **kw):
        try:
            from httpx2 import Request, Response
        except ImportError:
            from httpx import Request, Response
        url = f"https://huggingface.co/api/models/{repo_id}"
        raise huggingface_hub.errors.HfHubHTTPError("401 Client Error: Invalid credentials",
                                                    response=Response(401, request=Request("GET", url)))

    monkeypatch.setattr(hub, "list_repo_files", refused)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", refused)
    assert main(["quantize", REPO, str(tmp_path / "out"), "--method", "rtn", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "refused access" in err and "hf auth login" in err and "--resume" not in err and "\n" not in err
    for command in (["info", REPO], ["convert", REPO, str(tmp_path / "c"), "--format", "gptq"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert "is not a local folder" in err and "hf download" in err and "\n" not in err


def test_a_hub_model_keeps_its_named_chat_templates(tmp_path, monkeypatch):
    # transformers reads a model's further chat templates from additional_chat_templates/ (the route that
    # loads the whole model through transformers fetches them itself).
    src = tmp_path / "m"
    model_folder_with_text(src, "llama")
    (src / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    FakeHub(src, tmp_path / "cache", monkeypatch)
    assert main(["quantize", REPO, str(tmp_path / "q"), "--method", "rtn", "--group-size", "32", "--quiet"]) == 0
    assert (tmp_path / "q" / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ tools }}"


@pytest.mark.parametrize("route", [[], ["--no-stream"]])
def test_a_hub_model_with_pickled_weights_only_is_refused_on_every_route(tmp_path, monkeypatch, capsys, route):
    # transformers, asked for safetensors, would take those of an open conversion pull request instead.
    src = tmp_path / "m"
    model_folder_with_text(src, "llama")
    for f in src.glob("*.safetensors*"):
        f.unlink()
    (src / "pytorch_model.bin").write_bytes(b"not read")
    FakeHub(src, tmp_path / "cache", monkeypatch)
    assert main(["quantize", REPO, str(tmp_path / "q"), "--method", "rtn", *route, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no safetensors weights" in err and "\n" not in err, err


@pytest.mark.parametrize("settings", ["config.json", "quantize_config.json"])
def test_a_gptq_hub_model_loads_on_llmq(tmp_path, monkeypatch, settings):
    # Its config.json, read from the hub as a folder's is, sends it to the conversion as it is read
    # (transformers' own GPTQ loading needs optimum), for llmq.from_pretrained and llmq eval alike.
    import llmq
    from llmq.eval.models import quant_method
    from llmq.formats.convert import convert

    src = tmp_path / "m"
    model_folder_with_text(src, "llama")
    assert main(["quantize", str(src), str(tmp_path / "native"), "--method", "rtn", "--group-size", "32",
                 "--quiet"]) == 0
    convert(tmp_path / "native", tmp_path / "g", "gptq")
    if settings == "quantize_config.json":  # an older AutoGPTQ repository: the settings in the side file only
        config = json.loads((tmp_path / "g" / "config.json").read_text())
        del config["quantization_config"]
        (tmp_path / "g" / "config.json").write_text(json.dumps(config))
    hub = FakeHub(tmp_path / "g", tmp_path / "cache", monkeypatch)
    assert quant_method(REPO) == "gptq"
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(REPO, token="hf_given")(ids).logits,
                           llmq.from_pretrained(tmp_path / "native")(ids).logits)
    assert "hf_given" in hub.tokens  # the caller's token reaches every request, as transformers' would


def test_eval_reads_a_hub_model_at_the_revision_written_after_its_id(tmp_path, monkeypatch):
    # `owner/name@REV`: every request for it names REV, and it scores as its local copy does. Only the
    # reference's tokenizer is loaded: the others' would cost a hub round trip each, for nothing.
    from llmq.eval import models
    from llmq.formats.convert import convert

    src = tmp_path / "m"
    text = model_folder_with_text(src, "llama")
    assert main(["quantize", str(src), str(tmp_path / "native"), "--method", "rtn", "--group-size", "32",
                 "--quiet"]) == 0
    convert(tmp_path / "native", tmp_path / "g", "gptq")
    hub = FakeHub(tmp_path / "g", tmp_path / "cache", monkeypatch)
    tokenizers = []
    monkeypatch.setattr(models, "load_tokenizer", lambda *a: tokenizers.append(a) or loading.load_tokenizer(*a))
    out = tmp_path / "eval.json"
    assert main(["eval", str(src), str(tmp_path / "g"), f"{REPO}@v2", "--dataset", str(text), "--seqlen", "16",
                 "--no-kl", "--json", str(out), "--quiet"]) == 0
    fp, local, remote = json.loads(out.read_text())["models"]
    assert remote["model"] == f"{REPO}@v2" and remote["perplexity"] == local["perplexity"] != fp["perplexity"]
    assert "v2" in hub.revisions and None not in hub.revisions
    assert tokenizers == []  # the reference, a full-precision folder, brings its own through load_model


def test_only_a_hub_id_is_split_at_its_revision(tmp_path):
    from llmq.loading import split_revision

    assert split_revision("owner/name@4bit-32g") == ("owner/name", "4bit-32g")
    assert split_revision("owner/name") == ("owner/name", None)
    folder = tmp_path / "model@v2"
    folder.mkdir()
    assert split_revision(folder) == (str(folder), None)  # a folder whose name holds "@" is a folder
    assert split_revision("not a hub id@v2") == ("not a hub id@v2", None)


def test_a_hub_model_is_quantized_at_the_revision_asked_for(tmp_path, monkeypatch, capsys):
    src = tmp_path / "m"
    model_folder_with_text(src, "qwen3")
    args = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--quiet"]
    assert main(["quantize", str(src), str(tmp_path / "local"), *args]) == 0
    hub = FakeHub(src, tmp_path / "cache", monkeypatch)
    assert main(["quantize", REPO, str(tmp_path / "hub"), "--revision", "v2", *args]) == 0
    _assert_same(tmp_path / "local", tmp_path / "hub")
    # Every request names it: the listings and config.json the tag, the files after them the commit it named.
    first_commit = hub.revisions.index(hub.snapshot.name)
    assert set(hub.revisions[:first_commit]) == {"v2"} and set(hub.revisions[first_commit:]) == {hub.snapshot.name}
    capsys.readouterr()
    assert main(["quantize", str(src), str(tmp_path / "x"), "--revision", "v2", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "--revision names a version of a hub model" in err and "\n" not in err
