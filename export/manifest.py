"""manifest.json, written beside every artifact: what it was made from and for, and how well it matched.

The loaders read it before they touch the artifact and refuse one that does not fit: bytes
changed since export (sha256), another checkpoint (weights digest), other geometry or
preprocessing, another geometry mode (an exact artifact for a dense run, or the reverse), another
device type, GPU or TensorRT version. The refusal names each mismatch and the command that
rebuilds the artifact (or makes one in the run's mode).
"""
from __future__ import annotations

import json
import platform
import shlex
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from swssl.registry import BY_NAME
from swssl.files import atomic_write, sha256_file
from swssl.config import Config
from swssl.export.errors import ArtifactMismatch
from swssl.export.profile import BatchProfile

FORMAT = "swssl-export/1"
MANIFEST = "manifest.json"
INTERFACES = {"exact": "windows in, embeddings out", "dense": "images in, feature cells out"}
# Distribution names under which each library may be installed (first found wins).
_DISTRIBUTIONS = {
    "torch": ("torch",), "torchvision": ("torchvision",), "onnx": ("onnx",), "onnxscript": ("onnxscript",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11"),
    "swssl": ("swssl",),
}


def library_versions() -> dict[str, str | None]:
    """Installed versions (None: not installed), read from package metadata without importing."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name, candidates in _DISTRIBUTIONS.items():
        versions[name] = None
        for dist in candidates:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    versions["torch"] = torch.__version__  # the running one (a source build has no metadata)
    versions["cuda"] = torch.version.cuda
    return versions


def gpu_info(device: str | torch.device) -> dict[str, str] | None:
    """Name and compute capability of a CUDA device (None for the CPU or without CUDA)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST
    text = json.dumps(manifest, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest in `folder` (or beside the artifact file `folder`)."""
    folder = Path(folder)
    path = folder / MANIFEST if folder.is_dir() else folder.parent / MANIFEST
    if not path.is_file():
        raise ArtifactMismatch(f"{path}: no export manifest here (artifacts need the manifest.json that "
                               "swssl-export writes beside them; rebuild with swssl-export RUN_DIR)")
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as exc:
        raise ArtifactMismatch(f"{path}: cannot read the export manifest ({exc.strerror or exc}); "
                               "rebuild with swssl-export RUN_DIR") from None
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ArtifactMismatch(f"{path}: manifest.json is not valid JSON{where}; "
                               "rebuild with swssl-export RUN_DIR") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactMismatch(f"{path}: not a {FORMAT} manifest (format {found!r}); "
                               "rebuild with swssl-export RUN_DIR")
    manifest["_folder"] = str(path.parent)
    return manifest


def rebuild_command(manifest: dict[str, Any], run_dir: str | Path | None = None, mode: str | None = None) -> str:
    """The swssl-export command line that makes this artifact again (in geometry `mode`, when given)."""
    run = Path(run_dir) if run_dir is not None else Path(manifest.get("source", {}).get("run_dir", "RUN_DIR"))
    kind = manifest.get("kind", "onnx")
    own = manifest_mode(manifest)
    mode = mode or own
    parts = ["swssl-export", str(run), BY_NAME[kind].flag if kind in BY_NAME else "--onnx"]
    if kind != "onnx":
        parts += ["--precision", manifest.get("precision", "fp32")]
    if kind == "aoti":
        parts += ["--device", manifest.get("device", "cpu")]
    parts += mode_flags(mode, manifest.get("source", {}).get("run_mode"))
    if "batch" in manifest and mode == own:  # another mode's batch counts other things: its default applies
        parts += ["--batch", BatchProfile.from_dict(manifest["batch"]).text]
    if kind == "tensorrt" and manifest.get("tensorrt", {}).get("version_compatible"):
        parts.append("--version-compatible")
    folder = manifest.get("_folder")
    if folder and Path(folder).resolve().parent != (run / "export").resolve():
        parts += ["--out", str(Path(folder).parent)]
    return " ".join(shlex.quote(part) for part in parts)


def current_runtime(device: torch.device) -> dict[str, Any]:
    """What a TensorRT engine must match on this machine: TensorRT version and GPU."""
    try:
        import tensorrt

        version = tensorrt.__version__
    except ImportError:
        version = None
    return {"tensorrt": version, "gpu": gpu_info(device)}


def check_manifest(manifest: dict[str, Any], *, digest: str | None = None, config: Config | None = None,
                   device: str | torch.device | None = None, run_dir: str | Path | None = None,
                   runtime: dict[str, Any] | None = None) -> Path:
    """Refuse (ArtifactMismatch) an artifact that does not fit; returns the artifact's path.

    `digest`/`config` are the run's checkpoint's (checked when given); `device` the one it is to
    run on; `runtime` overrides what this machine offers (TensorRT version, GPU), for tests.
    """
    folder = Path(manifest["_folder"])
    artifact = folder / manifest.get("artifact", "")
    problems: list[str] = []
    verification = manifest.get("verification") or {}
    if not verification.get("passed"):
        problems.append("it failed verification against PyTorch when exported")
    for name, expected in {manifest.get("artifact", ""): manifest.get("artifact_sha256"),
                           **manifest.get("external_data", {})}.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name} changed since export (sha256 differs from the manifest's)")
    source = manifest.get("source", {})
    if digest is not None and source.get("weights_digest") != digest:
        problems.append(f"exported from other weights (digest {str(source.get('weights_digest'))[:12]}, "
                        f"the run's checkpoint has {digest[:12]})")
    other_mode = config is not None and config.geometry.mode != manifest_mode(manifest)
    if config is not None:
        problems += _config_differences(Config.from_dict(manifest.get("config", {})), config)
    kind = manifest.get("kind")
    if device is not None:
        device = torch.device(device)
        built_for = manifest.get("device", "cpu")
        if kind in BY_NAME and BY_NAME[kind].device_bound and built_for != device.type:
            problems.append(f"built for {built_for}, asked to run on {device.type}")
    if kind == "aoti":
        built = manifest.get("versions", {}).get("torch", "")
        if _minor(built) != _minor(torch.__version__):
            problems.append(f"compiled with torch {built}, this is torch {torch.__version__}")
    if kind == "tensorrt":
        problems += _engine_differences(manifest, runtime if runtime is not None
                                        else current_runtime(device or torch.device("cuda")))
    if problems:
        advice = f"make one for {config.geometry.mode} mode with" if other_mode else "rebuild it with"
        raise ArtifactMismatch(f"{artifact}: refused: {'; '.join(problems)}; {advice}: "
                               f"{rebuild_command(manifest, run_dir, config.geometry.mode if other_mode else None)}")
    return artifact


def mode_flags(mode: str, run_mode: str | None) -> list[str]:
    """The --mode option of a command line: always for dense, and for exact where the run's own mode is dense."""
    return ["--mode", mode] if "dense" in (mode, run_mode) else []


def manifest_mode(manifest: dict[str, Any]) -> str:
    """The geometry mode an artifact was exported in (manifests from before dense mode: exact)."""
    return manifest.get("config", {}).get("geometry", {}).get("mode", "exact")


def _config_differences(ours: Config, run: Config) -> list[str]:
    a, b = ours.to_dict(), run.to_dict()
    found = [_difference(section, key, a[section][key], b[section][key])
             for section in ("geometry", "preprocess") for key in a[section] if a[section][key] != b[section][key]]
    if ours.model.backbone != run.model.backbone:
        found.append(f"model.backbone: export {ours.model.backbone!r}, run {run.model.backbone!r}")
    return found


def _difference(section: str, key: str, export: Any, run: Any) -> str:
    if (section, key) == ("geometry", "mode"):
        return (f"geometry.mode: exported in {export} mode ({INTERFACES.get(export, '?')}), "
                f"the run is used in {run} mode")
    return f"{section}.{key}: export {export!r}, run {run!r}"


def _engine_differences(manifest: dict[str, Any], runtime: dict[str, Any]) -> list[str]:
    """TensorRT engines are tied to the GPU architecture and (unless version-compatible) the TensorRT version."""
    found = []
    built_gpu = manifest.get("gpu") or {}
    gpu = runtime.get("gpu")
    if gpu is None:
        found.append("a TensorRT engine needs a CUDA GPU and none is visible")
    elif built_gpu.get("compute_capability") != gpu.get("compute_capability"):
        found.append(f"built for compute capability {built_gpu.get('compute_capability')} "
                     f"({built_gpu.get('name')}), this GPU is {gpu.get('compute_capability')} ({gpu.get('name')})")
    built = manifest.get("versions", {}).get("tensorrt")
    current = runtime.get("tensorrt")
    if current is None:
        found.append("TensorRT is not installed (pip install 'swssl[gpu]')")
    elif manifest.get("tensorrt", {}).get("version_compatible"):
        if _major(current) != _major(built) or _version_tuple(current) < _version_tuple(built):
            found.append(f"version-compatible engine built with TensorRT {built} needs the same major "
                         f"version, same or newer; this is {current}")
    elif current != built:
        found.append(f"built with TensorRT {built}, this is TensorRT {current}")
    return found


def _version_tuple(version: str | None) -> tuple[int, ...]:
    parts = []
    for part in str(version or "").split("+")[0].split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def _minor(version: str | None) -> tuple[int, ...]:
    return _version_tuple(version)[:2]


def _major(version: str | None) -> tuple[int, ...]:
    return _version_tuple(version)[:1]
