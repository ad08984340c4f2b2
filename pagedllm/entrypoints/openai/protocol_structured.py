"""Request fields that constrain the output: OpenAI's ``response_format``, vLLM's
``structured_outputs`` and its older ``guided_*`` fields, all turned into one
``StructuredOutputsParams`` (a request may use one of them). A spec that does not parse is a 400
naming the field it came in."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagedllm.entrypoints.openai.errors import APIError
from pagedllm.sampling_params import StructuredOutputsParams
from pagedllm.structured_output.backend import check_grammar


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = "response"
    description: str | None = None
    # "schema" is a BaseModel attribute: the field is read from JSON under that alias.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(BaseModel):
    """vLLM's ``structured_outputs`` request field (its ``StructuredOutputsParams``). vLLM's
    other keys (structural_tag, whitespace_pattern, ...) are refused by name."""

    model_config = ConfigDict(extra="forbid")

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


class StructuredFields(BaseModel):
    """The fields of completions and chat requests that constrain the output."""

    structured_outputs: StructuredOutputsRequest | None = None
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # only xgrammar (or auto) is served

    def structured_params(self) -> StructuredOutputsParams | None:
        """The one constraint the request asks for (None: unconstrained); APIError (400)
        naming the field when it is malformed or when two fields ask for constraints."""
        found = [(name, spec) for name, spec in self._requested() if spec is not None]
        if self.guided_decoding_backend not in (None, "auto", "xgrammar"):
            raise APIError(f"guided_decoding_backend {self.guided_decoding_backend!r} is not "
                           "available: pagedllm's grammar engine is xgrammar.",
                           param="guided_decoding_backend")
        if not found:
            return None
        if len(found) > 1:
            names = ", ".join(name for name, _ in found)
            raise APIError(f"Only one kind of structured output may be requested; got {names}.",
                           param=found[1][0])
        param, spec = found[0]
        try:
            params = StructuredOutputsParams(**spec)
            check_grammar(params)
        except (TypeError, ValueError) as e:
            raise APIError(f"{param}: {e}", param=param) from None
        return params

    def _requested(self) -> list[tuple[str, dict[str, Any] | None]]:
        guided = [("guided_json", {"json": self.guided_json}),
                  ("guided_regex", {"regex": self.guided_regex}),
                  ("guided_choice", {"choice": self.guided_choice}),
                  ("guided_grammar", {"grammar": self.guided_grammar})]
        out = [(name, spec if next(iter(spec.values())) is not None else None)
               for name, spec in guided]
        so = self.structured_outputs
        if so is not None:
            out.append(("structured_outputs", so.model_dump(by_alias=True, exclude_none=True)))
        return [*out, ("response_format", self._response_format())]

    def _response_format(self) -> dict[str, Any] | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"json_object": True}
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise APIError("response_format of type json_schema needs json_schema.schema.",
                           param="response_format")
        return {"json": fmt.json_schema.json_schema}
