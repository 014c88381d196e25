"""The engines below the servicer: ONNX Runtime against torch on the same weights, the
model cache, the ncnn conversion, tiles and blending, and the backend choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.onnx import onnx_providers, resolve_engine_backend
from services.common.registry import load_registry
from services.common.settings import Settings
from services.upscale.engines import (
    EngineOptions,
    NetworkEngine,
    RealEsrganEngine,
    Swin2SREngine,
    build_engine_pool,
)
from services.upscale.networks import (
    REALESRGAN_NETWORKS,
    file_sha256,
    ncnn_to_state_dict,
    package_weights,
    rrdbnet,
)
from services.upscale.tiling import TileBlender, plan_tiles
from tests.services.upscale.conftest import Upscale


@pytest.mark.parametrize("method", ["realesrgan_4x", "realesrgan_4x_anime", "swin2sr"])
async def test_onnxruntime_and_torch_agree(ups: Upscale, upscale_cache: Path, method: str) -> None:
    served = ups.pool.get(method)
    assert isinstance(served, NetworkEngine) and served.backend.startswith("onnxruntime:")
    spec = ups.registry.get(method)
    assert spec is not None
    cls = Swin2SREngine if method == "swin2sr" else RealEsrganEngine
    engine = cls(
        spec,
        weights_dir=None,
        cache_dir=upscale_cache,
        torch_threads=2,
        options=EngineOptions(backend="torch"),
    )
    await engine.load()
    try:
        assert engine.ready and engine.backend == "torch"
        assert 24 % served.multiple_of == 0 and 32 % served.multiple_of == 0
        batch = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(1))
        x = batch.numpy()
        expected = await engine.runner.call(lambda: engine.forward_blocking(x))
        got = await served.runner.call(lambda: served.forward_blocking(x))
        assert (
            got.shape
            == expected.shape
            == (2, 3, x.shape[2] * served.net_scale, x.shape[3] * served.net_scale)
        )
        assert float(np.abs(got - expected).max()) < 1e-3
    finally:
        await engine.close()


async def test_weights_and_onnx_are_cached_by_hash_and_opset(ups: Upscale, upscale_cache: Path) -> None:
    _, bin_path = package_weights(REALESRGAN_NETWORKS["x4plus"])
    converted = upscale_cache / "upscale" / f"realesrgan-x4plus-{file_sha256(bin_path)[:16]}.safetensors"
    assert converted.is_file()
    exports = sorted(p.name for p in (upscale_cache / "onnx").glob("*.onnx"))
    digest = file_sha256(converted)[:16]
    assert f"realesrgan-x4plus-{digest}-opset17.onnx" in exports
    assert any(name.startswith("realesrgan-x4plus-anime-") for name in exports)
    assert any(name.startswith("swin2sr-") for name in exports)
    # realesrgan_4x, realesrgan_2x and the tiled test method share one conversion and one export.
    assert len([n for n in exports if n.startswith("realesrgan-x4plus-") and "anime" not in n]) == 1
    before = {p: p.stat().st_mtime_ns for p in (upscale_cache / "onnx").glob("*.onnx")}
    spec = ups.registry.get("realesrgan_4x_anime")
    assert spec is not None
    again = RealEsrganEngine(spec, weights_dir=None, cache_dir=upscale_cache, torch_threads=2)
    await again.load()
    try:
        assert again.ready
        assert {p: p.stat().st_mtime_ns for p in (upscale_cache / "onnx").glob("*.onnx")} == before
    finally:
        await again.close()


def test_ncnn_conversion_zips_every_convolution() -> None:
    network = REALESRGAN_NETWORKS["x4plus-anime"]
    param, bin_path = package_weights(network)
    net = rrdbnet(network)
    state = ncnn_to_state_dict(param, bin_path, net)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 96 and len(state) == 2 * 96
    net.load_state_dict(state, strict=True)
    assert state["conv_first.weight"].shape == (64, 3, 3, 3)
    assert state["conv_last.weight"].shape == (3, 64, 3, 3)
    assert float(state["body.0.rdb1.conv1.weight"].abs().sum()) > 0
    with pytest.raises(ValueError, match="num_block"):
        ncnn_to_state_dict(param, bin_path, rrdbnet(REALESRGAN_NETWORKS["x4plus"]))


@pytest.mark.parametrize(("height", "width"), [(5, 7), (48, 48), (49, 100), (130, 61)])
def test_tiles_cover_the_image_with_one_shape(height: int, width: int) -> None:
    tiles = plan_tiles(height, width, tile=48, overlap=16)
    covered = np.zeros((height, width), dtype=int)
    for t in tiles:
        assert (t.height, t.width) == (min(48, height), min(48, width))
        assert t.y + t.height <= height and t.x + t.width <= width
        covered[t.y : t.y + t.height, t.x : t.x + t.width] += 1
    assert covered.min() >= 1


def test_blending_reassembles_consistent_tiles_exactly() -> None:
    rng = np.random.default_rng(0)
    full = rng.random((3, 70 * 2, 90 * 2)).astype(np.float32)
    blender = TileBlender(3, 70, 90, scale=2, overlap=8)
    for t in plan_tiles(70, 90, tile=32, overlap=8):
        blender.add(t, full[:, t.y * 2 : (t.y + t.height) * 2, t.x * 2 : (t.x + t.width) * 2])
    assert np.abs(blender.result() - full).max() < 1e-5


def test_providers_in_preference_order_and_backend_choice() -> None:
    assert onnx_providers(["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert onnx_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_engine_backend("auto") == "onnxruntime"
    assert resolve_engine_backend("torch") == "torch"


async def test_auto_batching_is_off_on_a_cpu_provider(upscale_cache: Path, upscale_registry: Path) -> None:
    """batch_max_size 0 (auto): batch only on a GPU execution provider; here there is none."""
    from services.upscale.server import engine_options

    settings = Settings(model_cache_dir=upscale_cache, registry_path=upscale_registry, batch_max_size=0)
    options = engine_options(settings)
    assert options.auto_batch and options.batch_max_size == 8
    registry = load_registry(upscale_registry)
    pool = build_engine_pool(registry, cache_dir=upscale_cache, torch_threads=2, options=options)
    engine = pool.engines["realesrgan_4x_anime"]
    await engine.load()
    try:
        assert engine.backend.startswith(("onnxruntime:CPU", "torch"))  # type: ignore[attr-defined]
        assert not engine.batcher.enabled and engine.batcher.max_batch_size == 1  # type: ignore[attr-defined]
    finally:
        await pool.close()
