"""Doc-QA data: prompt templates and truncation (loaders and the synthetic generator join here)."""
from .template import TEMPLATES, build_prompt_ids, encode_prompt, render_prompt

__all__ = ["TEMPLATES", "build_prompt_ids", "encode_prompt", "render_prompt"]
