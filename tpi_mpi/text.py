"""Text in and out, on rank 0 only: the tokenizer (tokenizers), chat templates (jinja2) and
streaming detokenisation. No other rank ever imports this module's data.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .errors import ConfigError


def _token_text(tok) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class TextCodec:
    """Tokenizer, special tokens and chat template of a model folder (or a prepared rank0/)."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise ConfigError(f"{path} is missing: the model folder needs its tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:
            raise ConfigError(f"{path} is not a valid tokenizer ({str(e).splitlines()[0]}): re-download it") from None
        cfg_path = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        gen_path = folder / "generation_config.json"
        self.generation = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        self.template = self._template(folder)

    def _template(self, folder: Path) -> str | None:
        jinja = folder / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text()
        t = self.config.get("chat_template")
        if isinstance(t, list):   # named templates: use the default one
            t = next((x["template"] for x in t if x.get("name") == "default"), None)
        return t

    def stop_ids(self) -> set[int]:
        """End-of-turn ids beyond the model's EOS: the tokenizer's eos_token and generation_config's."""
        ids = set()
        if (eos := self.id_of(self.special("eos_token"))) is not None:
            ids.add(eos)
        eos = self.generation.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return ids

    def special(self, key: str) -> str:
        return _token_text(self.config.get(key)) or ""

    def encode(self, text: str) -> list[int]:
        """A plain prompt, with the special tokens the tokenizer adds itself (BOS for Llama)."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.template:
            raise ConfigError("this model has no chat template (tokenizer_config.json chat_template): drop --chat")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message: str):
            raise ConfigError(f"chat template: {message}")

        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.special("bos_token"), eos_token=self.special("eos_token"))
        except jinja2.TemplateError as e:
            raise ConfigError(f"chat template failed to render: {e}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # the rendered template already holds every special token (HF's apply_chat_template does the same)
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def id_of(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token) if token else None


class Streamer:
    """Turns a growing list of token ids into text deltas, holding back incomplete characters.

    Incremental (as vLLM's detokenizer): a token decodes only the ids since the last text given out
    plus the few before them (`ids[prefix:]`), whose text is known, so that the tokenizer's rules at
    a boundary (a leading space dropped at the start of a decode) see the same neighbours as in the
    whole answer. Decoding the whole answer every token made a long answer's text cost O(n^2)."""

    def __init__(self, codec: TextCodec) -> None:
        self.codec, self.ids, self.shown = codec, [], ""
        self.prefix = self.read = 0          # ids[prefix:read]: already given out, kept as context

    def push(self, token: int) -> str:
        self.ids.append(token)
        known = self.codec.decode(self.ids[self.prefix:self.read])
        text = self.codec.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(known):   # a multi-byte character is not complete yet
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return self._out(text[len(known):])

    def finish(self) -> str:
        """Whatever is still held back once generation has ended."""
        known = self.codec.decode(self.ids[self.prefix:self.read])
        text = self.codec.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return self._out(text[len(known):])

    def _out(self, delta: str) -> str:
        self.shown += delta
        return delta


class StopFilter:
    """Cuts the text at the first stop string and holds back a tail that may begin one, so that a
    stream never shows a stop string, nor part of one (OpenAI leaves it out of the text)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending, self.text, self.stopped = "", "", False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        buf = self.pending + delta
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = buf[:min(hits)], "", True
        else:
            keep = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1))
                        if buf.endswith(s[:k])), default=0)
            out, self.pending = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self.text += out
        return out

    def finish(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        self.text += out
        return out
