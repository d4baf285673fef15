"""A 6000x4000 photo runs through tiled deraining on the CPU in bounded memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import resource, numpy as np, torch
    from nerdrain.inference import derain
    torch.manual_seed(0)
    # A stand-in with the network's size contract (pads to 16) but cheap, so the test measures the
    # tiling machinery: buffers, batching and blending, not the network's activations.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 3, 3, padding=1)).eval()
    image = np.random.default_rng(0).integers(0, 256, (4000, 6000, 3), dtype=np.uint8)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = derain(image, model, tile=512, overlap=32, batch_size=4, device="cpu")
    assert out.shape == image.shape and out.dtype == np.uint8
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(base, peak)
""")


def test_6000x4000_photo_tiled_on_cpu_stays_within_a_few_gb():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    base_kb, peak_kb = map(int, result.stdout.split())
    # The image itself is 72 MB as uint8; float32 input and output buffers add ~0.6 GB.
    assert peak_kb / 2**20 < 3.0, f"peak RSS {peak_kb / 2**20:.2f} GB"


WEIGHT_SCRIPT = textwrap.dedent("""
    import resource, torch
    from nerdrain.tiling import TileConfig, run_tiled
    image = torch.full((1, 1, 6000, 8000), 0.25)  # one channel: a full-size weight map would double the buffers
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = run_tiled(lambda x: x, image, TileConfig(tile=512, overlap=32, batch_size=4))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert float((out - image).abs().max()) < 1e-6
    print(base, peak, out.numel() * out.element_size() // 1024)
""")


def test_tiled_blending_needs_no_full_size_weight_map():
    """The output buffer is the only full-size array the blend needs: the summed weight is the outer
    product of the two axes' sums (a 20000x15000 photo kept a 1.1 GB weight map beside its output)."""
    result = subprocess.run([sys.executable, "-c", WEIGHT_SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    base_kb, peak_kb, out_kb = map(int, result.stdout.split())
    # output (183 MB) plus a batch of tiles and the interpreter's own growth; a weight map would add 183 MB
    assert peak_kb - base_kb < 1.5 * out_kb, f"{(peak_kb - base_kb) / 1024:.0f} MB beyond the input"
