"""The inflated video UNet: parity with diffusers' 2D UNet at init, causality, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from huvidpo.models import InflatedConv, PickleWeightsError, VideoUNet
from huvidpo.models.tiny import TINY_UNET_CONFIG

TEMPORAL = (".conv1d.", ".conv_gate.", ".attn_temp.", ".norm_temp.")


def make_pair(mode: str = "first+prev", seed: int = 0) -> tuple[UNet2DConditionModel, VideoUNet]:
    torch.manual_seed(seed)
    unet2d = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    return unet2d, VideoUNet.from_unet2d(unet2d, sparse_causal=mode).eval()  # type: ignore[arg-type]


def randomise_temporal(video: VideoUNet, which: tuple[str, ...] = TEMPORAL, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in video.named_parameters():
            if any(w in name for w in which) and ".norm_temp." not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("mode", ["first+prev", "first"])
def test_identical_frames_give_the_2d_unet_output_per_frame(mode: str) -> None:
    unet2d, video = make_pair(mode)
    frame = torch.randn(2, 4, 8, 8)
    clip = frame[:, :, None].repeat(1, 1, 5, 1, 1)
    text = torch.randn(2, 16, 32)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = unet2d(frame, t, text).sample
        out = video(clip, t, text)
    assert out.shape == clip.shape
    for f in range(clip.shape[2]):
        torch.testing.assert_close(out[:, :, f], expected, rtol=0, atol=1e-5)


def test_inflation_keeps_every_2d_weight_and_zero_initialises_the_new_ones() -> None:
    unet2d, video = make_pair()
    state = video.unet.state_dict()
    for key, value in unet2d.state_dict().items():
        module, _, leaf = key.rpartition(".")
        mapped = f"{module}.conv2d.{leaf}" if f"{module}.conv2d.{leaf}" in state else key
        assert torch.equal(state[mapped], value), key
    new = {k: v for k, v in state.items() if any(t in k for t in (".conv1d.", ".conv_gate."))}
    assert new and all(torch.count_nonzero(v) == 0 for v in new.values())
    outs = [k for k in state if ".attn_temp.to_out.0.weight" in k]
    assert outs and all(torch.count_nonzero(state[k]) == 0 for k in outs)
    n_inflated = sum(isinstance(m, InflatedConv) for m in video.modules())
    # conv_in, conv_out, 2 convs per resnet (+ shortcuts) and the samplers all get a temporal conv.
    assert n_inflated >= 2 + 2 * 5


def _frames_changed(video: VideoUNet, k: int, frames: int = 6) -> list[bool]:
    torch.manual_seed(3)
    clip = torch.randn(1, 4, frames, 8, 8)
    text = torch.randn(1, 16, 32)
    perturbed = clip.clone()
    perturbed[:, :, k] += torch.randn(4, 8, 8)
    with torch.no_grad():
        a, b = video(clip, 20, text), video(perturbed, 20, text)
    return [not torch.allclose(a[:, :, f], b[:, :, f], atol=1e-6) for f in range(frames)]


def test_temporal_conv_is_causal() -> None:
    _, video = make_pair("first")
    randomise_temporal(video, (".conv1d.", ".conv_gate."))
    changed = _frames_changed(video, k=3)
    assert changed == [False, False, False, True, True, True]


def test_sparse_causal_first_mode_isolates_frames_without_temporal_layers() -> None:
    _, video = make_pair("first")
    # temporal layers at zero: frames meet only through attention to frame 0.
    assert _frames_changed(video, k=3) == [False, False, False, True, False, False]
    assert all(_frames_changed(video, k=0))


def test_sparse_causal_first_plus_prev_propagates_forward_only() -> None:
    _, video = make_pair("first+prev")
    changed = _frames_changed(video, k=2)
    assert changed[:2] == [False, False]
    assert changed[2] and changed[3]


def test_temporal_attention_sees_all_frames() -> None:
    _, video = make_pair("first")
    randomise_temporal(video, (".attn_temp.",))
    # Temporal attention has no mask: a later frame influences earlier ones too.
    changed = _frames_changed(video, k=4)
    assert changed[1] and changed[4]


def test_spatial_only_is_exactly_the_2d_unet_even_with_trained_temporal_layers() -> None:
    unet2d, video = make_pair()
    randomise_temporal(video)
    x = torch.randn(1, 4, 1, 8, 8)
    text = torch.randn(1, 16, 32)
    with torch.no_grad():
        out = video(x, 30, text, spatial_only=True)
        ref = unet2d(x[:, :, 0], torch.tensor([30]), text).sample
    torch.testing.assert_close(out[:, :, 0], ref, rtol=0, atol=1e-5)


def test_save_and_load_round_trip_in_safetensors(tmp_path: Path) -> None:
    _, video = make_pair()
    randomise_temporal(video)
    video.save_pretrained(tmp_path / "unet")
    files = {p.name for p in (tmp_path / "unet").iterdir()}
    assert "diffusion_pytorch_model.safetensors" in files
    assert not any(n.endswith((".bin", ".pth")) for n in files)
    loaded = VideoUNet.from_pretrained_any(tmp_path / "unet")
    clip, text = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(clip, 5, text), video(clip, 5, text), rtol=0, atol=0)


def test_a_2d_sd_unet_directory_is_inflated_on_load(tmp_path: Path) -> None:
    unet2d, video = make_pair()
    unet2d.save_pretrained(tmp_path / "unet2d")
    loaded = VideoUNet.from_pretrained_any(tmp_path / "unet2d")
    clip, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(clip, 5, text), video(clip, 5, text), rtol=0, atol=1e-6)


def test_a_model_directory_with_a_2d_sd_unet_loads_inflated(tmp_path: Path) -> None:
    """What ``POST /v1/models`` records as ``unet: image``: the whole directory loads through
    ``load_components`` with the 2D UNet inflated (spatial weights kept, temporal layers added)."""
    from huvidpo.models import load_components
    from huvidpo.models.tiny import write_tiny_model

    d = write_tiny_model(tmp_path / "m", unet_2d=True)
    assert "VideoUNet" not in (d / "unet" / "config.json").read_text()
    comps = load_components(d)
    assert isinstance(comps.unet, VideoUNet)
    unet2d = UNet2DConditionModel.from_pretrained(d / "unet", use_safetensors=True).eval()
    x, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 16, 32)
    with torch.no_grad():
        ref = unet2d(x[:, :, 0], torch.tensor([5]), text).sample
        torch.testing.assert_close(comps.unet(x, 5, text)[:, :, 0], ref, rtol=0, atol=1e-5)


def test_pickle_weights_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    unet2d, _ = make_pair()
    d = tmp_path / "unet"
    unet2d.save_pretrained(d)
    (d / "diffusion_pytorch_model.safetensors").unlink()
    (d / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(PickleWeightsError, match="safetensors only"):
        VideoUNet.from_pretrained_any(d)


def test_stage1_pattern_selects_temporal_layers_and_sparse_causal_query() -> None:
    _, video = make_pair()
    names = video.temporal_parameter_names()
    assert names
    assert all(any(p in n for p in (".conv1d.", ".conv_gate.", ".attn_temp.", "attn1.to_q.")) for n in names)
    assert any("attn1.to_q" in n for n in names)
    assert not any("attn2" in n or ".conv2d." in n for n in names)


def test_gradients_reach_the_input_through_checkpointed_blocks() -> None:
    _, video = make_pair()
    video.enable_gradient_checkpointing()
    video.train()
    randomise_temporal(video)
    for p in video.parameters():
        p.requires_grad_(False)
    trainable = [p for n, p in video.named_parameters() if ".conv1d." in n]
    for p in trainable:
        p.requires_grad_(True)
    out = video(torch.randn(1, 4, 3, 8, 8), 5, torch.randn(1, 16, 32))
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_safetensors_only_directory_check_accepts_safetensors(tmp_path: Path) -> None:
    d = tmp_path / "w"
    d.mkdir()
    save_file({"x": torch.zeros(1)}, str(d / "model.safetensors"))
    (d / "old.bin").write_bytes(b"x")
    from huvidpo.models import ensure_safetensors

    ensure_safetensors(d)  # safetensors present: pickle files beside it are ignored, never read


def test_real_size_inflation_matches_the_reference_architecture() -> None:
    """SD-1.x UNet inflated on the meta device (no memory): parameter counts of the spec, section 2.5."""
    from huvidpo.models.tiny import SD15_UNET_CONFIG

    with torch.device("meta"):
        video = VideoUNet(unet_config=SD15_UNET_CONFIG)

    def millions(part: str) -> float:
        return sum(p.numel() for n, p in video.named_parameters() if part in n) / 1e6

    assert sum(p.numel() for p in video.parameters()) / 1e6 == pytest.approx(1101.1, abs=0.1)
    assert millions(".conv1d.") == pytest.approx(191.4, abs=0.1)
    assert millions(".conv_gate.") == pytest.approx(0.53, abs=0.01)
    assert millions(".attn_temp.") + millions(".norm_temp.") == pytest.approx(49.6, abs=0.1)
    stage1 = set(video.temporal_parameter_names())
    assert sum(p.numel() for n, p in video.named_parameters() if n in stage1) / 1e6 == pytest.approx(
        254, abs=0.5
    )


def _ops_of_forward(video: VideoUNet, clip: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> list[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record() as rec:
        video(clip, t, text)
    return rec.ops


# Ops that copy host data to the device (an index or tensor built from a Python list) or read a
# device value on the host: each one blocks a CUDA stream and rules out CUDA graphs.
HOST_SYNC_OPS = (
    "aten.index.Tensor",
    "aten.lift_fresh",
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.item",
)


@pytest.mark.parametrize("mode", ["first+prev", "first"])
def test_the_video_unet_forward_builds_no_index_on_the_host(mode: str) -> None:
    _, video = make_pair(mode)
    ops = _ops_of_forward(video, torch.randn(1, 4, 5, 8, 8), torch.tensor([10]), torch.randn(1, 16, 32))
    assert ops, "the recorder saw nothing"
    synced = sorted({op for op in ops if op.startswith(HOST_SYNC_OPS)})
    assert synced == [], synced


@pytest.mark.parametrize("mode", ["first+prev", "first"])
def test_the_sparse_causal_gather_equals_indexing_frame_0_and_the_previous_frame(mode: str) -> None:
    from huvidpo.models.layers import FrameContext, SparseCausalAttnProcessor

    b, f, n, c = 2, 5, 3, 4
    x = torch.randn(b * f, n, c)
    got = SparseCausalAttnProcessor(FrameContext(num_frames=f), mode)._gather(x, b, f)  # type: ignore[arg-type]
    xs = x.reshape(b, f, n, c)
    first = xs[:, [0] * f]
    want = first if mode == "first" else torch.cat([first, xs[:, [max(i - 1, 0) for i in range(f)]]], dim=2)
    assert torch.equal(got, want.reshape(b * f, -1, c))


def test_temporal_attention_in_chunks_under_the_block_budget_matches_one_call() -> None:
    from huvidpo.models.layers import VideoTransformerBlock

    _, video = make_pair()
    randomise_temporal(video)
    # In float64, so that matrix products blocked differently for another batch size round alike.
    video = video.double()
    clip, t, text = (
        torch.randn(2, 4, 5, 8, 8).double(),
        torch.tensor([10, 500]),
        torch.randn(2, 16, 32).double(),
    )
    with torch.no_grad():
        whole = video(clip, t, text)
    calls: list[int] = []
    blocks = [m for m in video.modules() if isinstance(m, VideoTransformerBlock)]
    hooks = [
        blk.attn_temp.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0])) for blk in blocks
    ]
    video.ctx.attention_block_budget = 3 * blocks[0].attn_temp.heads  # 3 sequences per call
    try:
        with torch.no_grad():
            chunked = video(clip, t, text)
    finally:
        for h in hooks:
            h.remove()
    assert max(calls) <= 3 and len(calls) > len(blocks)  # it did run in chunks, none over budget
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
