"""Loading the official layouts, and the specific errors a user gets for bad input."""

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from transformers import T5EncoderModel

from minflux import hub, loading
from minflux.module_tree import compute_dtype
from minflux.pipeline import load_pipeline
from tests.test_transformer import inputs, run_both
from tests.tiny_repo import copy_repo, write_tiny_repo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_repo(tmp_path_factory.mktemp("tiny") / "FLUX.1-dev", layout="both")


def edit_file(path: Path, edit):
    sd = load_file(path)
    edit(sd)
    save_file(sd, path)


def test_all_six_pieces_load_with_their_stored_dtype(tiny, tmp_path):
    repo = copy_repo(tiny, tmp_path / "bf16")
    edit_file(repo / "flux1-dev.safetensors", lambda sd: sd.update({k: v.bfloat16() for k, v in sd.items()}))
    pipe = load_pipeline(str(repo))
    assert {p.dtype for p in pipe.flow.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.ae.parameters()} == {torch.float32}
    assert not any(p.is_meta for m in (pipe.flow, pipe.ae, pipe.t5, pipe.clip) for p in m.parameters())
    assert {p.dtype for p in load_pipeline(str(repo), dtype="fp32").flow.parameters()} == {torch.float32}


def test_missing_and_unexpected_keys_are_named(tiny, tmp_path):
    repo = copy_repo(tiny, tmp_path / "keys")

    def edit(sd):
        del sd["double_blocks.1.txt_mlp.0.bias"]
        sd["double_blocks.1.txt_mlp.9.bias"] = torch.zeros(3)

    edit_file(repo / "flux1-dev.safetensors", edit)
    with pytest.raises(ValueError, match=r"missing keys: double_blocks\.1\.txt_mlp\.0\.bias.*"
                                         r"unexpected keys: double_blocks\.1\.txt_mlp\.9\.bias"):
        load_pipeline(str(repo))


def test_a_shape_mismatch_names_the_key_and_both_shapes(tiny, tmp_path):
    repo = copy_repo(tiny, tmp_path / "shape")
    edit_file(repo / "flux1-dev.safetensors",
              lambda sd: sd.update({"double_blocks.0.img_mlp.2.bias": torch.zeros(31)}))
    message = r"double_blocks\.0\.img_mlp\.2\.bias has shape \(31,\), expected \(32,\)"
    with pytest.raises(ValueError, match=message):
        load_pipeline(str(repo))


def test_a_truncated_safetensors_file_is_reported_with_its_path(tiny, tmp_path):
    repo = copy_repo(tiny, tmp_path / "truncated")
    data = (repo / "ae.safetensors").read_bytes()
    (repo / "ae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"ae\.safetensors: unreadable safetensors file \(truncated"):
        load_pipeline(str(repo))


def test_a_folder_that_is_not_a_flux_repo_says_what_is_missing(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=r"is not a FLUX repo: missing text_encoder/config\.json.*"
                                                r"flux1-\*\.safetensors or transformer/"):
        load_pipeline(str(tmp_path))


def test_a_string_that_is_neither_folder_nor_repo_id_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither a folder nor a HF repo id"):
        hub.Repo(str(tmp_path / "no" / "such" / "folder"))


@pytest.mark.parametrize("path", ["/no-such-folder", "./no-such-folder", "~/no-such-folder"])
def test_a_missing_folder_with_one_slash_is_not_taken_for_a_repo_id(path):
    with pytest.raises(ValueError, match="neither a folder nor a HF repo id"):
        hub.Repo(path)


def test_dtype_names_are_checked():
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        loading.parse_dtype("int8")


class GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers every request the way the HF hub answers for a gated repo and no token."""

    def do_GET(self):
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model org/gated is restricted.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_a_gated_repo_without_token_explains_how_to_get_access(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path / "hf")}
    try:
        run = subprocess.run([sys.executable, "sample.py", "--model", "org/gated", "--prompt", "x"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert run.returncode != 0
    assert "org/gated is a gated repo" in run.stderr and "HF_TOKEN" in run.stderr
    assert "--model toy" in run.stderr  # what to run meanwhile
    assert "Traceback" not in run.stderr


def unreachable_hub(tmp_path) -> dict:
    """An environment whose HF hub is a closed local port and whose HF cache is tmp_path/hf."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return env | {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}


@pytest.mark.slow
def test_an_unreachable_hub_is_reported_within_seconds_with_the_toy_hint(tmp_path):
    start = time.perf_counter()
    command = [sys.executable, "sample.py", "--model", "org/x", "--prompt", "x", "--device", "cpu"]
    run = subprocess.run(command, cwd=ROOT, env=unreachable_hub(tmp_path), capture_output=True, text=True,
                         timeout=120)
    assert time.perf_counter() - start < 10  # not huggingface_hub's 25 s of retries
    assert run.returncode != 0
    assert "org/x: not in the HF cache and the hub cannot be reached (offline?)" in run.stderr
    assert "--model toy" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_an_unreachable_hub_falls_back_to_the_copy_in_the_hf_cache(tmp_path):
    cached = tmp_path / "hf" / "hub" / "models--org--x"
    (cached / "snapshots" / ("0" * 40) / "vae").mkdir(parents=True)
    (cached / "snapshots" / ("0" * 40) / "vae" / "config.json").write_text("{}")
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("0" * 40)
    start = time.perf_counter()
    script = "from minflux.hub import Repo; print(sorted(Repo('org/x').files))"
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=unreachable_hub(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - start < 10
    assert run.stdout.strip() == "['vae/config.json']", run.stderr


@pytest.mark.slow
def test_sample_py_help_explains_every_flag():
    run = subprocess.run([sys.executable, "sample.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0
    for flag in ("--model", "--prompt", "--prompt-file", "--width", "--height", "--steps", "--guidance",
                 "--seed", "--num-images", "--out", "--device", "--dtype", "--offload"):
        assert flag in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--model", "org/x"], "org/x: not in the HF cache and the hub cannot be reached (offline?). "
                           "To try everything without the real weights, use --model toy"),
    (["--model", "org/x", "--device", "cdua"], "unknown device 'cdua'"),
    (["--model", "org/x", "--steps", "0"], "--steps: must be at least 1, got 0"),
    (["--model", "/no/such/model", "--lora", "{bad}"], "not a readable safetensors LoRA file"),
], ids=["offline-not-cached", "bad-device", "zero-steps", "corrupt-lora-before-model"])
def test_sample_py_reports_bad_input_in_one_line_without_a_traceback(tmp_path, args, message):
    (tmp_path / "bad.safetensors").write_text("not a safetensors file")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    args = [a.format(bad=tmp_path / "bad.safetensors") for a in args]
    # the last flag wins
    run = subprocess.run([sys.executable, "sample.py", "--prompt", "x", "--device", "cpu", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert message in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("schnell,limit", [(False, 512), (True, 256)], ids=["dev", "schnell"])
def test_the_t5_limit_is_known_from_the_config_or_the_single_files_header(tmp_path, schnell, limit):
    repo = write_tiny_repo(tmp_path / "repo", layout="bfl", schnell=schnell)
    assert loading.t5_max_length(hub.Repo(str(repo))) == limit
    assert load_pipeline(str(repo)).t5_tokenizer.max_length == limit
    (repo / "transformer" / "config.json").unlink()  # a BFL file alone: its key names tell
    assert loading.t5_max_length(hub.Repo(str(repo))) == limit


def test_an_fp16_t5_loads_as_bf16_and_stays_finite_where_fp16_overflows(tiny, tmp_path):
    repo = copy_repo(tiny, tmp_path / "fp16")
    t5 = T5EncoderModel.from_pretrained(tiny / "text_encoder_2").eval()
    with torch.no_grad():  # T5-XXL's feed-forward outputs exceed fp16's 65504; make the tiny one's do too
        t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(40000.0)
        tokens = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
        assert t5.encoder.block[0](t5.shared(tokens))[0].abs().max() > 65504
    shutil.rmtree(repo / "text_encoder_2")
    t5.half().save_pretrained(repo / "text_encoder_2", max_shard_size="100KB")
    ours = loading.load_t5(hub.Repo(str(repo)))
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        got, want = ours(tokens).float(), loading.load_t5(hub.Repo(str(repo)), torch.float32)(tokens)
    assert got.isfinite().all()
    print(f"bf16 vs fp32: max abs diff {(got - want).abs().max():.2e}, scale {want.abs().max():.2e}")
    assert (got - want).abs().max() < 0.02 * want.abs().max()  # bf16 keeps 8 bits of mantissa


def test_a_comfyui_all_in_one_checkpoint_gives_its_transformer(tiny, tmp_path):
    path = tmp_path / "flux1-dev-fp8.safetensors"  # Comfy-Org's layout: transformer, CLIP-L, T5 (fp8) and VAE
    sd = {f"model.diffusion_model.{k}": v for k, v in load_file(tiny / "flux1-dev.safetensors").items()}
    sd |= {f"text_encoders.clip_l.transformer.{k}": v.half() for k, v in
           load_file(tiny / "text_encoder" / "model.safetensors").items()}
    for shard in (tiny / "text_encoder_2").glob("*.safetensors"):
        for k, v in load_file(shard).items():
            sd[f"text_encoders.t5xxl.transformer.{k}"] = v.to(torch.float8_e4m3fn)
    sd |= {f"vae.{k}": v.bfloat16() for k, v in load_file(tiny / "ae.safetensors").items()}
    save_file(sd, path)
    want = loading.load_flow(hub.Repo(str(tiny))).state_dict()
    got = loading.load_flow(hub.Repo(str(tiny)), transformer=path).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_transformer_file_with_diffusers_names_computes_what_diffusers_computes(tiny, tmp_path):
    ref = FluxTransformer2DModel.from_pretrained(tiny / "transformer").eval()
    save_file(ref.state_dict(), tmp_path / "diffusers-names.safetensors")
    ours = loading.load_flow(hub.Repo(str(tiny)), transformer=tmp_path / "diffusers-names.safetensors")
    got, want = run_both(ref, ours, inputs(ours.params))
    assert (got - want).abs().max() < 1e-5
    assert loading.t5_max_length(hub.Repo(str(tiny)), tmp_path / "diffusers-names.safetensors") == 512  # dev


def edit_diffusers_shard(key: str, edit):
    """An edit of the transformer/ shard holding `key`."""
    def apply(repo: Path):
        index_file = repo / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
        index = json.loads(index_file.read_text())
        edit_file(repo / "transformer" / index["weight_map"][key], lambda sd: edit(sd, key))
    return apply


def drop(sd, key):
    return sd.pop(key)


@pytest.mark.parametrize("edit,message", [
    (edit_diffusers_shard("transformer_blocks.0.attn.to_q.weight", drop),
     r"transformer: not a diffusers FLUX transformer; "
     r"missing keys: transformer_blocks\.0\.attn\.to_q\.weight$"),
    (edit_diffusers_shard("transformer_blocks.1.attn.to_v.bias", drop),
     r"missing keys: transformer_blocks\.1\.attn\.to_v\.bias$"),
    (edit_diffusers_shard("single_transformer_blocks.0.proj_mlp.weight", drop),
     r"transformer: .*missing keys: single_transformer_blocks\.0\.proj_mlp\.weight$"),
    (edit_diffusers_shard("x_embedder.weight", drop), r"transformer: .*missing keys: x_embedder\.weight$"),
    (edit_diffusers_shard("proj_out.weight", lambda sd, key: sd.update({"pos_embed.weight": torch.zeros(2)})),
     r"transformer: .*unexpected keys: pos_embed\.weight$"),
    (lambda repo: edit_file(repo / "vae" / "diffusion_pytorch_model.safetensors",
                            lambda sd: drop(sd, "decoder.conv_in.weight")),
     r"vae: not a FLUX autoencoder checkpoint: missing decoder\.conv_in\.weight$"),
], ids=["to_q", "to_v-bias", "proj_mlp", "x_embedder", "unexpected", "vae"])
def test_a_diffusers_folder_with_a_missing_or_unexpected_key_names_the_folder_and_the_key(
        tiny, tmp_path, edit, message):
    repo = copy_repo(tiny, tmp_path / "diffusers")
    (repo / "flux1-dev.safetensors").unlink()
    (repo / "ae.safetensors").unlink()
    edit(repo)
    with pytest.raises(ValueError, match=message):
        load_pipeline(str(repo))


def test_a_single_file_without_a_flux_key_names_the_file(tiny, tmp_path):
    repo = copy_repo(tiny, tmp_path / "final")
    edit_file(repo / "flux1-dev.safetensors", lambda sd: sd.pop("final_layer.linear.weight"))
    message = (r"flux1-dev\.safetensors: not a FLUX transformer checkpoint: missing "
               r"final_layer\.linear\.weight$")
    with pytest.raises(ValueError, match=message):
        load_pipeline(str(repo))


def test_a_shard_missing_from_its_index_is_named_before_anything_is_read(tiny, tmp_path):
    repo = copy_repo(tiny, tmp_path / "shard")
    shard = sorted((repo / "text_encoder_2").glob("model-*.safetensors"))[1]
    shard.unlink()
    (repo / "flux1-dev.safetensors").write_bytes(b"")  # nothing may be read before the check
    with pytest.raises(FileNotFoundError, match=rf"missing text_encoder_2/{shard.name};"):
        load_pipeline(str(repo))


def test_shards_of_a_folder_that_a_root_single_file_replaces_need_not_be_there(tiny, tmp_path):
    repo = copy_repo(tiny, tmp_path / "root_only")
    shards = list((repo / "transformer").glob("diffusion_pytorch_model-*.safetensors"))
    assert shards and (repo / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    for shard in shards:
        shard.unlink()  # a partial download: flux1-dev.safetensors and the folder's json files
    loading.check_repo(hub.Repo(str(repo)))  # the root file is what load_flow reads


def test_an_all_fp8_file_loads_in_the_requested_dtype(tiny, tmp_path):
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(tiny / "flux1-dev.safetensors").items()}
    save_file(sd, tmp_path / "fp8.safetensors")
    save_file({k: v.float() for k, v in sd.items()}, tmp_path / "fp32.safetensors")
    repo = hub.Repo(str(tiny))
    flow = loading.load_flow(repo, torch.float32, tmp_path / "fp8.safetensors")
    assert compute_dtype(flow) == torch.float32
    want = loading.load_flow(repo, transformer=tmp_path / "fp32.safetensors")
    x = {**inputs(flow.params, batch=1), "timesteps": torch.tensor([0.9]), "guidance": torch.tensor([3.5])}
    with torch.no_grad():
        assert (flow(**x) - want(**x)).abs().max() < 1e-5


def test_a_folder_given_as_transformer_is_called_a_folder(tiny):
    message = r"transformer: a folder; give a FLUX transformer \.safetensors"
    with pytest.raises(FileNotFoundError, match=message):
        loading.check_repo(hub.Repo(str(tiny)), tiny / "transformer")
