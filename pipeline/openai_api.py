"""The OpenAI API's request and response shapes: request bodies to token ids and SamplingParams, engine outputs to
completion bodies and server-sent-event chunks. No I/O here: pipeline.serve reads the requests and sends the answers."""

import json

from pipeline.params import SamplingParams, request_problems

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "min_tokens", "stop_token_ids",
                   "ignore_eos")


class ApiError(Exception):
    """A request the server refuses: becomes an OpenAI-shaped error body with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}



def param_of(message: str) -> str | None:
    for name in SAMPLING_FIELDS + ("prompt", "messages"):
        if message.startswith(name) or f" {name} " in message or f"({name})" in message or f"{name} (" in message:
            return name
    return "messages" if "prompt" in message else None


def sampling_params(body: dict, default_max_tokens: int | None, index: int) -> SamplingParams:
    """SamplingParams from an OpenAI request body (choice `index` of n gets seed + index)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = default_max_tokens
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, list | tuple):
        raise ApiError(400, f"stop must be a string or a list of strings, got {stop!r}", "stop")
    seed = body.get("seed")
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    stop_token_ids = body.get("stop_token_ids") or ()
    if not isinstance(stop_token_ids, list | tuple):
        raise ApiError(400, f"stop_token_ids must be a list of token ids, got {stop_token_ids!r}", "stop_token_ids")
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
                            top_k=body.get("top_k") or 0, top_p=1.0 if top_p is None else top_p,
                            seed=seed + index if isinstance(seed, int) and not isinstance(seed, bool) else seed,
                            stop=tuple(stop), stop_token_ids=tuple(stop_token_ids),
                            ignore_eos=bool(body.get("ignore_eos", False)), min_tokens=body.get("min_tokens") or 0)


def check(params: SamplingParams, prompt_ids: list, limits) -> None:
    problems = request_problems(params, prompt_ids, limits)
    if problems:
        raise ApiError(400, "; ".join(problems), param_of(problems[0]))


def completion_prompts(llm, body: dict) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        prompts = prompt
    else:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                            f"token ids, got {json.dumps(prompt)[:80]}", "prompt")
    out = []
    for p in prompts:
        if isinstance(p, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise ApiError(400, "a token-id prompt must be a list of whole numbers", "prompt")
        if isinstance(p, str) and llm.tokenizer is None:
            raise ApiError(400, f"the model {llm.artifact.name} has no tokenizer; send token ids as the prompt",
                           "prompt")
        out.append(llm.encode(p))
    return out


def chat_prompt(llm, body: dict) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects",
                       "messages")
    flat = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise ApiError(400, "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                               "messages")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError(400, "each message needs a string role and string (or text-part) content", "messages")
        flat.append({"role": m["role"], "content": content})
    if llm.tokenizer is None or not getattr(llm.tokenizer, "chat_template", None):
        raise ApiError(400, f"the model {llm.artifact.name} has no chat template; use /v1/completions with a plain "
                            f"prompt, or build it with a tokenizer that has one (model.tokenizer)", "messages")
    from jinja2 import TemplateError

    try:
        return llm.apply_chat_template(flat)
    except (TemplateError, ValueError) as exc:  # e.g. a template that refuses a role order
        raise ApiError(400, f"the chat template refused these messages: {exc}", "messages") from None


def usage(prompt_lens: list[int], outputs: list) -> dict:
    completion = sum(len(o.output_ids) for o in outputs)
    return {"prompt_tokens": sum(prompt_lens), "completion_tokens": completion,
            "total_tokens": sum(prompt_lens) + completion}



def completion_body(rid: str, created: int, model: str, chat: bool, outputs: list, prompt_lens: list[int]) -> dict:
    """The whole answer of a non-streaming request: one choice per output, in order."""
    choices = []
    for i, out in enumerate(outputs):
        choice = {"index": i, "finish_reason": out.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice["text"] = out.text
        choices.append(choice)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": usage(prompt_lens, outputs)}


class ChunkWriter:
    """Server-sent events of one streaming request: a chunk per output, the usage chunk, the end marker."""

    DONE = "data: [DONE]\n\n"

    def __init__(self, rid: str, created: int, model: str, chat: bool, include_usage: bool):
        self.rid, self.created, self.model, self.chat, self.include_usage = rid, created, model, chat, include_usage
        self.kind = "chat.completion.chunk" if chat else "text_completion"
        self.started: set[int] = set()  # chat choices whose first delta (with the role) went out

    def event(self, data: dict) -> str:
        return f"data: {json.dumps(data)}\n\n"

    def chunk(self, index: int, out) -> str:
        reason = out.finish_reason if out.finished else None
        if self.chat:
            delta = {"content": out.delta_text}
            if index not in self.started:
                delta = {"role": "assistant", **delta}
                self.started.add(index)
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": out.delta_text, "logprobs": None, "finish_reason": reason}
        data = {"id": self.rid, "object": self.kind, "created": self.created, "model": self.model,
                "choices": [choice]}
        if self.include_usage:
            data["usage"] = None
        return self.event(data)

    def usage_chunk(self, prompt_lens: list[int], outputs: list) -> str:
        return self.event({"id": self.rid, "object": self.kind, "created": self.created, "model": self.model,
                           "choices": [], "usage": usage(prompt_lens, outputs)})
