"""Doc-QA data: records and loaders, prompt templates and truncation, lengths and buckets,
and the synthetic generator (engine.data.synthetic)."""
from .jsonl import DataError, read_docqa_jsonl
from .lengths import LengthCache, length_buckets, prompt_lengths, record_prompt_ids
from .loaders import FORMATS, check_unique_ids, detect_format, load_docqa, load_records
from .records import TASKS, DocQADataset, DocQARecord, task_for_source, write_docqa
from .template import TEMPLATES, build_prompt_ids, encode_prompt, render_prompt

__all__ = ["DocQARecord", "DocQADataset", "load_docqa", "load_records", "write_docqa", "detect_format", "FORMATS",
           "DataError",
           "read_docqa_jsonl", "TEMPLATES", "build_prompt_ids", "encode_prompt", "render_prompt",
           "prompt_lengths", "length_buckets", "record_prompt_ids", "LengthCache", "synthetic", "TASKS",
           "task_for_source", "check_unique_ids"]


def __getattr__(name: str):
    """engine.data.synthetic on first use: imported here eagerly, `python -m engine.data.synthetic`
    would find it already loaded (runpy's warning)."""
    if name == "synthetic":
        import importlib
        return importlib.import_module(".synthetic", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
