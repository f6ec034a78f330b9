"""Render a model's chat template (Jinja) exactly as transformers does, without letting it run code.

    text = render_chat_template(template, messages, add_generation_prompt=True, bos_token="<s>")

Chat templates ship inside checkpoints downloaded from anywhere, so they are untrusted programs. They run in
jinja2's ImmutableSandboxedEnvironment (no underscore attributes, no mutation of lists and dicts), with the
same helpers and whitespace settings as transformers' `apply_chat_template`, so the text, and hence the
tokens, are the same. Anything the sandbox refuses, and any `raise_exception(...)` in the template, becomes
a one-line UserError.
"""

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nanoft.errors import UserError

# Older jinja2 releases have known ways out of the sandbox.
if tuple(int(part) for part in jinja2.__version__.split(".")[:3]) < (3, 1, 6):
    raise ImportError(
        f"nanoft needs jinja2>=3.1.6 for a safe chat template sandbox, found {jinja2.__version__}"
    )


class GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text (for masks); render it as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


class TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself (and its `mro()`) to them."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, so a template cannot shadow Python internals."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2's Namespace, so `namespace(self=1)` works
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name, value):
        TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes HTML characters (<, >, &), which would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals.update(
        raise_exception=raise_exception,
        strftime_now=strftime_now,
        dict=TemplateDict(),
        namespace=TemplateNamespace,
    )
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise UserError(f"chat template has a syntax error on line {error.lineno}: {error.message}") from None


def render_chat_template(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = False,
    tools=None,
    documents=None,
    **variables,
) -> str:
    """The template's text for `messages`; `variables` are bos_token, eos_token, ... and template options."""
    if not messages:
        raise UserError("cannot apply a chat template to an empty conversation; give at least one message")
    # Like transformers: a key whose value is None is dropped, templates test for missing keys, not None.
    messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
    try:
        return compile_chat_template(template).render(
            messages=messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.exceptions.SecurityError as error:
        raise UserError(
            f"chat template tried something the sandbox forbids ({error}); the template is unsafe"
        ) from None
    except jinja2.TemplateError as error:
        raise UserError(f"chat template refused the conversation: {error}") from None
