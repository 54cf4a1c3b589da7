"""The package as users get it: the built wheel, installed into a fresh venv with no repository
beside it, trains, evaluates and analyzes with a shipped config; the light core runs a model.

One venv, the core first and the training extra added (jax and the rest come from pip's cache
after the first run); each install prints its size and time (docs/install.md records them)."""
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# What the wheel is built from; a copy, so that the build leaves nothing in the checkout.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "resnet_jax", "configs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (REPO / name).is_dir() else {}))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
         cwd=out)
    (built,) = out.glob("resnet_jax-*.whl")
    return built


def _run(args, cwd, timeout=1200, env=None):
    env = {k: v for k, v in (env or os.environ).items() if k not in ("PYTHONPATH", "LD_PRELOAD",
                                                                    "RESNET_JAX_PRELOADED")}
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=dict(env, JAX_PLATFORMS="cpu",
                                                    TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _venv(tmp_path, wheel):
    """A fresh venv in tmp_path with the wheel (the light core) installed; its bin/ folder."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    _install(venv / "bin", wheel)
    return venv / "bin"


def _install(bin_, wheel, extras=""):
    """pip install the wheel with `extras` into the venv of `bin_`; prints the venv's size and the
    install's time (docs/install.md records them)."""
    start = time.perf_counter()
    _run([bin_ / "python", "-m", "pip", "install", "-q", f"{wheel}{extras}"], cwd=bin_.parent)
    venv = bin_.parent
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    print(f"install{extras or ' (core)'}: {size / 2**20:.0f} MiB, "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)


@pytest.mark.slow
def test_the_light_core_runs_a_model_and_with_train_added_the_wheel_trains(wheel, tmp_path):
    """As a user goes: `pip install resnet-jax` to import the models, later `resnet-jax[train]`
    into the same venv to train, evaluate and analyze (one venv: the second install is the
    extras only)."""
    bin_ = _venv(tmp_path, wheel)
    code = ("import importlib.util, jax, jax.numpy as jnp, numpy as np, resnet_jax\n"
            "m = resnet_jax.create_model('resnet20', widths=(4, 8, 16))\n"
            "v = jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))\n"
            "x = resnet_jax.preprocessing('resnet20')(np.zeros((2, 32, 32, 3), np.uint8))\n"
            "print(m.apply(v, x).shape, len(resnet_jax.capture_responses(m, v, x)))\n"
            "print([p for p in ('tensorflow_datasets', 'grain', 'matplotlib', 'tensorboardX',\n"
            "                   'ml_collections', 'simplejpeg') if importlib.util.find_spec(p)])\n")
    out = _run([bin_ / "python", "-c", code], cwd=tmp_path).stdout.splitlines()
    assert out == ["(2, 10) 19", "[]"], out
    table = _run([bin_ / "resnet-jax-summary", "resnet20"], cwd=tmp_path).stdout
    assert "0.0406G" in table, table

    _install(bin_, wheel, "[train]")
    work = tmp_path / "run"
    _run([bin_ / "resnet-jax-train", "--config", "cpu:tiny", "--workdir", work,
          "--config.num_steps=4", "--config.lr_boundaries=(2, 3)", "--config.log_every=2",
          "--config.checkpoint_every=4", "--config.data.source=synthetic:128"], cwd=tmp_path)
    # the repository's own command line, run where only the package is
    _run([bin_ / "python", "-m", "resnet_jax.train", "--config", "configs/cifar10.py:resnet20",
          "--describe"], cwd=tmp_path)
    evaluated = _run([bin_ / "resnet-jax-evaluate", "--checkpoint", work, "--data",
                      "synthetic:64", "--num_images", "32"], cwd=tmp_path)
    assert "(32 images)" in evaluated.stdout, evaluated.stdout
    _run([bin_ / "resnet-jax-analyze", f"{work}=tiny", "--data", "synthetic:64", "--out",
          tmp_path / "analysis"], cwd=tmp_path)
    assert (tmp_path / "analysis" / "figure7.png").is_file()
    shipped = _run([bin_ / "python", "-c", "import resnet_jax.config as c; "
                    "print(c.configs_dir(), c.available_configs())"], cwd=tmp_path).stdout
    assert "site-packages/resnet_jax/configs ['cifar10', 'cpu', 'imagenet']" in shipped
