"""Hugging Face interop without torch: config parsing (`config`), tensor mappings
(`mapping`), streaming safetensors (`safetensors_io`), import/export
(`importer`, `exporter`, `family`). See docs/interop.md."""
