"""Sparse mixture-of-experts research codebase in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.1,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "grain>=0.2.12,<0.3",
    "gin-config>=0.5,<0.6",
    "tensorboard>=2.18,<3",
    "tensorboardX>=2.6,<3",
    "numpy>=1.26,<3",
    "matplotlib>=3.8,<4",
    # tokenizers: an imported model's tokenizer.json (HF byte-level BPE, WordPiece,
    # Unigram with their normalizers/pre-tokenizers; a hand-written BPE would get the
    # byte-level mapping, merge ranks and added tokens subtly wrong). A 3.4 MB abi3
    # Rust wheel (11 MB installed; it pulls huggingface_hub, ~8 MB pure Python); no torch.
    "tokenizers>=0.21,<1",
    # scripts/prepare_data.py: .zst JSONL (zstandard), Parquet as dataset hubs export it
    # (pyarrow), the progress bar with tokens/s and ETA (tqdm).
    "zstandard>=0.22,<1",
    "pyarrow>=15,<30",
    "tqdm>=4.66,<5",
]

EXTRAS_REQUIRE = {
    "gpu": ["jax[cuda12]>=0.10.1,<0.11"],
    "tpu": ["jax[tpu]>=0.10.1,<0.11"],
    # seqio pulls TensorFlow through tensorflow-text (the full `tensorflow`
    # wheel; a separate tensorflow-cpu would install the same package twice).
    "seqio": ["seqio>=0.0.19,<0.1", "tensorflow>=2.18,<2.22", "sentencepiece>=0.2,<0.3"],
    # What docs/notebooks.md tells users to run: `jupyter lab`, with the .ipynb <->
    # py:percent pairing (jupytext). The CI executes the notebooks in a kernel (dev).
    "notebooks": ["jupyterlab>=4,<5", "jupytext>=1.16,<2", "ipykernel>=6,<8",
                  "nbformat>=5,<6"],
    # tokamax: its Pallas ragged_dot as the `tokamax` dispatch (moe/dispatch/tokamax_backend.py);
    # 7 small pure-Python wheels over jax (qwix, pydantic, jaxtyping, ...); "xla" on CPU.
    "tokamax": ["tokamax>=0.0.12,<0.1"],
    # gs:// workdirs and corpora (experiments/runtime/paths.py): gcsfs serves etils.epath's
    # gs:// paths, google-cloud-storage the workdir lease and tensorboardX's event files.
    "gcs": ["gcsfs>=2024.6", "google-cloud-storage>=2.14,<4"],
    # safetensors: the pretrained-weights upcycling and import tests write their fixtures
    # with it (scripts/import_hf.py and export_hf.py read/write safetensors themselves).
    "import": ["safetensors>=0.4,<1"],
    # sentencepiece: the SentencePiece tokenizer tests (a small wheel, no TensorFlow);
    # nbclient, ipykernel, nbformat: tests/test_notebooks.py runs the notebooks in a kernel.
    # The gcs extra and gcp-storage-emulator (pure Python): tests/runtime/test_gcs_workdir.py
    # runs a workdir and a corpus in a bucket of a GCS emulator on localhost.
    "dev": ["pytest>=8", "pytest-xdist>=3", "tbparse>=0.0.9", "ruff>=0.5",
            "safetensors>=0.4,<1", "jupytext>=1.16,<2", "sentencepiece>=0.2,<0.3",
            "nbclient>=0.10,<1", "ipykernel>=6,<8", "nbformat>=5,<6",
            "gcsfs>=2024.6", "google-cloud-storage>=2.14,<4", "gcp-storage-emulator>=2024.8"],
}

setup(
    name="sparse-moe",
    version="0.1.0",
    description="Sparse mixture-of-experts routing, balancing, dispatch and training in JAX/Flax NNX",
    python_requires=">=3.10",
    packages=find_packages(include=["moe", "moe.*", "layers", "layers.*",
                                    "experiments", "experiments.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
