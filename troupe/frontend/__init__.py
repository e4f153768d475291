"""The OpenAI-compatible HTTP frontend: ``troupe frontend``, or :class:`Frontend` in code.

It watches discovery for instances that declare a model (``metadata["model"]``), keeps one
Router per (model, serving endpoint), and answers ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions`` (streamed as Server-Sent Events or not), plus ``/health``, ``/live`` and
``/metrics``, over HTTP or HTTPS (:class:`FrontendTls`), optionally behind an API key. See
``docs/frontend.md`` for the routes, the engine protocol and the errors, ``docs/security.md``
for HTTPS, client certificates and the API key.
Prompts are tokenized (:class:`Tokenizer`; :class:`WordTokenizer` unless the settings name
another) and the ids sent to the worker with the request.

    async with Frontend(rt, FrontendSettings(host="127.0.0.1", port=0)) as fe:
        print(fe.url)
"""

from troupe.frontend._app import FrontendSettings
from troupe.frontend._metrics import FrontendMetrics
from troupe.frontend._models import ModelEntry, ModelRegistry, ModelTable
from troupe.frontend._serve import Frontend
from troupe.frontend._state import ROUTER_MODES
from troupe.frontend._tls import FrontendTls
from troupe.frontend._tokenizer import Tokenizer, WordTokenizer

__all__ = [
    "ROUTER_MODES",
    "Frontend",
    "FrontendMetrics",
    "FrontendSettings",
    "FrontendTls",
    "ModelEntry",
    "ModelRegistry",
    "ModelTable",
    "Tokenizer",
    "WordTokenizer",
]
