"""The environment variables the engine reads or sets, as data: the one table behind the configuration
reference (``medsam-engine config reference``, docs/configuration.md) and the defaults `--engine ray` sets.

Each entry gives the variable's name, its default (the value that applies while it is unset, or None when
unset means "not used"; for ``engine_sets`` entries, the value the engine sets itself when the environment
has none) and its meaning. tests/core/test_environment.py checks that every ``MEDSAM_ENGINE_*`` name in the
code, and every variable the code reads by a literal name, is listed here, and that the defaults agree with
the constants of the modules that read them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variable:
    """One environment variable: ``default`` applies while it is unset (None: unset means "not used");
    ``engine_sets``: the engine sets ``default`` itself when the environment has no value."""

    name: str
    default: str | None
    meaning: str
    engine_sets: bool = False


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "MEDSAM_ENGINE_ID_KEY",
        None,
        "key of the keyed hash (HMAC-SHA256 of the content hash) that names cases; unset: a random key "
        "created once per store in STORE/_key. Stores given the same key name the same input alike",
    ),
    Variable(
        "MEDSAM_ENGINE_CACHE",
        "~/.cache/medsam-engine",
        "cache of the encoder/decoder graphs exported for the CPU runtimes, and, for a store on object "
        "storage, the folder archives are unpacked and downloads kept in (a local store uses STORE/_cache); "
        "passed on to Ray actors",
    ),
    Variable(
        "MEDSAM_ENGINE_READ_TIMEOUT_S",
        "1800",
        "seconds one case's isolated reader process may take; a decoder that hangs longer fails its case",
    ),
    Variable(
        "MEDSAM_ENGINE_MAX_VOXELS",
        "1073741824",
        "most voxels an image's header may claim (default 2³⁰, a 512×512×4096 CT); beyond it the case "
        "fails before any pixel is read",
    ),
    Variable(
        "MEDSAM_ENGINE_PROGRESS_S",
        "30",
        "seconds between progress lines on stderr when the output is not a terminal (and in a flow "
        "run's log)",
    ),
    Variable(
        "MEDSAM_ENGINE_GPU_SHARE",
        "1",
        "fraction of its GPU this process holds; memory-sized batches scale by it. Each Ray actor sets it "
        "from its GPU share (--gpus-per-actor); not meant to be set by hand",
    ),
    Variable(
        "MEDSAM_ENGINE_DICOMWEB_TOKEN",
        None,
        "DICOMweb bearer token (first choice of credentials; never logged, stored or passed to Ray actors)",
    ),
    Variable(
        "MEDSAM_ENGINE_DICOMWEB_USER",
        None,
        "DICOMweb HTTP basic user, with MEDSAM_ENGINE_DICOMWEB_PASSWORD (when no token is given)",
    ),
    Variable("MEDSAM_ENGINE_DICOMWEB_PASSWORD", None, "DICOMweb HTTP basic password (empty when unset)"),
    Variable(
        "MEDSAM_ENGINE_DICOMWEB_CREDENTIALS",
        "$XDG_CONFIG_HOME/medsam-engine/dicomweb.yaml",
        "file (YAML or JSON) of DICOMweb credentials when neither token nor user is set: {token: …} or "
        "{user: …, password: …}, or such entries keyed by http(s)://host:port; the default file is used "
        "when it exists. Ray actors are given its path, never a secret",
    ),
    Variable(
        "MEDSAM_ENGINE_DICOMWEB_RETRIES",
        "6",
        "retries of a DICOMweb request after HTTP 429/5xx, a refused or dropped connection or a timeout",
    ),
    Variable(
        "MEDSAM_ENGINE_DICOMWEB_BACKOFF_S",
        "0.5",
        "first wait between DICOMweb retries in seconds, doubling up to 30 s (Retry-After is honoured)",
    ),
    Variable("MEDSAM_ENGINE_DICOMWEB_TIMEOUT_S", "60", "seconds one DICOMweb request may take"),
    Variable(
        "XDG_CONFIG_HOME",
        "~/.config",
        "where the default DICOMweb credentials file (medsam-engine/dicomweb.yaml) is looked for",
    ),
    Variable(
        "AWS_ENDPOINT_URL",
        None,
        "endpoint of an S3-compatible object store for s3:// inputs and stores; it and the other AWS_* "
        "variables (keys, region, profile) are read by s3fs, not by the engine",
    ),
    Variable(
        "PREFECT_API_URL",
        None,
        "Prefect server that records --engine ray flow runs; unset: a temporary server started for the run",
    ),
    Variable(
        "RAY_ADDRESS",
        None,
        "Ray cluster for --engine ray when --ray-address is not given (host:port, auto or ray://…); "
        "unset: a local Ray started for the run",
    ),
    Variable(
        "RAY_AUTH_TOKEN",
        None,
        "token of a Ray cluster with token authentication; given, a host:port address is joined with "
        "RAY_AUTH_MODE=token",
    ),
    Variable("RAY_AUTH_TOKEN_PATH", None, "file holding the Ray cluster's token (as RAY_AUTH_TOKEN)"),
    Variable(
        "RAY_AUTH_MODE",
        None,
        "Ray's authentication mode; token uses ~/.ray/auth_token. Set to token by the engine when a token "
        "is given and this is unset",
    ),
    Variable(
        "OMP_NUM_THREADS",
        None,
        "threads of the CPU runtimes when torch is not loaded; unset: the runtime's own default (one per "
        "physical core). Each Ray actor sets it to its CPUs (--cpus-per-actor)",
    ),
    Variable(
        "CUDA_VISIBLE_DEVICES",
        None,
        "GPUs this process may use; empty or -1 hides them all (then device auto is the CPU, told without "
        "importing torch). A Ray actor without a GPU share sets it empty",
    ),
    Variable("HIP_VISIBLE_DEVICES", None, "ROCm's CUDA_VISIBLE_DEVICES; empty or -1 hides every GPU"),
    Variable(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
        "120",
        "seconds the temporary Prefect server of an --engine ray run may take to start (small machines)",
        engine_sets=True,
    ),
    Variable(
        "PREFECT_SERVER_ANALYTICS_ENABLED",
        "false",
        "Prefect server telemetry (it can lock the server's database); off unless asked for",
        engine_sets=True,
    ),
    Variable("DO_NOT_TRACK", "1", "no usage data sent by Prefect unless asked for", engine_sets=True),
    Variable("RAY_USAGE_STATS_ENABLED", "0", "no usage data sent by Ray unless asked for", engine_sets=True),
)


def variable(name: str) -> Variable:
    """The table's entry for ``name``; KeyError naming it when the table has none."""
    for entry in VARIABLES:
        if entry.name == name:
            return entry
    raise KeyError(f"{name} is not in the environment table (pipeline/core/environment.py)")


def engine_defaults() -> dict[str, str]:
    """{name: value} of the variables the engine sets itself when the environment has no value."""
    return {
        entry.name: entry.default for entry in VARIABLES if entry.engine_sets and entry.default is not None
    }
