r"""Rebuild docs/figures/*.png: sample grids of the default digits model per sampler and guidance.

    python train.py --config configs/digits.py --workdir /tmp/digits_default
    python train_classifier.py --config configs/digits_classifier.py --workdir /tmp/digits_classifier
    python docs/make_figures.py --workdir /tmp/digits_default --classifier_workdir /tmp/digits_classifier

Every grid is one ``sample.py`` call (100 samples, seed 0, class c in column c); this script runs
them, pastes the PNGs side by side with a title each, and prints how often the digits feature
extractor's classifier (``diffusion_jax.evaluation.digits``, 0.949 held-out accuracy) reads each
sample as the class it was asked for.
"""

import argparse
import pathlib
import subprocess
import sys
import tempfile

from PIL import Image, ImageDraw

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLERS = [
    ("ddpm", 0), ("ddpm", 100), ("ddpm", 25),
    ("ddim", 50), ("ddim", 25), ("ddim", 10),
    ("euler", 25), ("euler", 10), ("heun", 25),
    ("heun", 10), ("dpm_solver_2m", 25), ("dpm_solver_2m", 10),
]  # fmt: skip
NFE = {"heun": lambda n: 2 * n - 1}  # Heun's last step is an Euler step


def run(workdir: str, tmp: pathlib.Path, *flags: str) -> tuple[pathlib.Path, float]:
    """One sample.py call into a fresh folder under ``tmp``: (its PNG, class agreement)."""
    import numpy as np

    from diffusion_jax.evaluation import digits

    out = tmp / str(len(list(tmp.iterdir())))
    cmd = [sys.executable, str(ROOT / "sample.py"), f"--workdir={workdir}", "--num_samples=100",
           f"--output_dir={out}", *flags]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    (png,) = out.glob("*.png")
    with np.load(png.with_suffix(".npz")) as f:
        images, labels = f["arr_0"].astype(np.float32) / 127.5 - 1.0, f["arr_1"]
    logits, _ = digits.digits_logits_and_features(digits.upsample_digits(images))
    return png, float(np.mean(np.argmax(logits, -1) == labels))


def montage(tiles: list[tuple[str, pathlib.Path]], columns: int, path: pathlib.Path) -> None:
    images = [Image.open(p).convert("RGB") for _, p in tiles]
    w, h = images[0].size
    title, pad = 18, 8
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + title + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ((name, _), image) in enumerate(zip(tiles, images, strict=True)):
        print(f"{path.name}: {name}")
        r, c = divmod(i, columns)
        x, y = pad + c * (w + pad), pad + r * (h + title + pad)
        draw.text((x, y), name, fill="black")
        sheet.paste(image, (x, y + title))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    print(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--classifier_workdir")
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        tiles = []
        for sampler, steps in SAMPLERS:
            png, agree = run(args.workdir, tmp, f"--sampler={sampler}", f"--num_steps={steps}")
            n = steps or 1000
            name = f"{sampler} {n} steps, NFE {NFE.get(sampler, lambda k: k)(n)}"
            tiles.append((f"{name}; class agreement {agree:.2f}", png))
        montage(tiles, 3, pathlib.Path(args.out) / "samplers.png")
        tiles = []
        for w in (0, 1, 2, 4):
            png, agree = run(args.workdir, tmp, "--sampler=dpm_solver_2m", "--num_steps=25",
                             f"--guidance_scale={w}")  # fmt: skip
            tiles.append((f"classifier-free w={w} (dpm++ 25); agreement {agree:.2f}", png))
        if args.classifier_workdir:
            for s in (0, 1, 4, 10):
                png, agree = run(args.workdir, tmp, "--sampler=ddpm", "--num_steps=100",
                                 "--guidance_scale=0", f"--classifier_workdir={args.classifier_workdir}",
                                 f"--classifier_scale={s}")  # fmt: skip
                tiles.append((f"uncond. + classifier s={s} (ddpm 100); agreement {agree:.2f}", png))
        montage(tiles, 4, pathlib.Path(args.out) / "guidance.png")


if __name__ == "__main__":
    main()
