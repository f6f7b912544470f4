"""The recipe's `eval.judge:` section: an LLM judge scored on every run that asks for it (evaluate/judge.py does the
judging; `judge_run(settings, ...)` takes this section).

    eval:
      judge:
        url: http://localhost:8000/v1      # an OpenAI-compatible endpoint (vLLM, llama.cpp, Ollama, OpenAI, ...)
        model_name: qwen2.5-7b-instruct    # the model served there
        api_key_env: OPENAI_API_KEY        # the variable that holds the key (never the key itself)
        max_examples: 50
    or
      judge:
        model: HuggingFaceTB/SmolLM2-1.7B-Instruct   # a model tuneforge loads: hub id, folder, run directory, embedded:

pairwise (on by default): base vs tuned on each held-out prompt, judged in both orders (position bias measured);
grade: each answer also gets a 1-10 score against the rubric (length bias measured).

This module imports nothing of tuneforge but recipe_base, so recipe.py can hold the section without an import loop
(evaluate/judge.py, which loads judge models, imports from here, never the other way round).
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from tuneforge.recipe_base import KeyedValueError, Section

DEFAULT_RUBRIC = (
    "Judge how well the answer does what the user asked: correctness first, then completeness, then following "
    "the requested format exactly. Do not reward length: a short correct answer beats a long one with errors "
    "or padding."
)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# What API keys look like (OpenAI sk-..., Anthropic sk-ant-..., Hugging Face hf_..., Google AIza..., bearer JWTs):
# written where the variable's name belongs, the recipe (saved in every run directory) would leak it.
KEY_LIKE = re.compile(r"^(sk-|sk_|hf_|AIza|gsk_|xai-|eyJ)|^[A-Za-z0-9_\-]{40,}$")


class JudgeSection(Section):
    model: str | None = Field(None, description="A judge model tuneforge loads (hub id, model folder, run directory, "
                              "embedded:smollm2-135m-instruct). Or url + model_name, not both.")
    url: str | None = Field(None, description="An OpenAI-compatible chat API base URL (http(s)://host:port/v1) that "
                            "serves the judge; needs model_name.")
    model_name: str | None = Field(None, description="With url: the name of the model served there (the request's "
                                   "`model` field).")
    api_key_env: str = Field("OPENAI_API_KEY", description="With url: the environment variable that holds the API key "
                             "(sent as a Bearer token when set). The key itself never goes in a recipe.")
    rubric: str = Field(DEFAULT_RUBRIC, min_length=1, description="What the judge is told to reward.")
    max_examples: int | None = Field(50, gt=0, description="Held-out examples judged (None: all that were scored).")
    pairwise: bool = Field(True, description="Base vs tuned on each prompt, judged twice (both orders): the tuned win "
                           "rate with its 95% interval, position consistency, first-position and longer-answer rates.")
    grade: bool = Field(False, description="Also score each answer 1-10 against the rubric (mean, length correlation).")
    max_new_tokens: int = Field(256, gt=0, description="The judge's reply budget (a short justification and verdict).")

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_recipe(cls, data):
        if isinstance(data, dict):
            for key in ("api_key", "key", "token", "api_token"):
                if key in data:
                    raise KeyedValueError(f"eval.judge.{key}", "never write an API key in a recipe (it is saved in every "
                                          "run directory): put it in an environment variable and name the variable "
                                          "with api_key_env, e.g. api_key_env: OPENAI_API_KEY")
        return data

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL; give the API base, e.g. http://localhost:8000/v1")
        if value is not None and "@" in value.split("/")[2]:
            raise ValueError("credentials in the URL would be saved with the recipe in every run directory: give the "
                             "URL without user:password@ and the key through api_key_env")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if KEY_LIKE.search(value):
            raise ValueError("this looks like an API key, not the name of a variable: never write the key in a recipe; "
                             "export it (export OPENAI_API_KEY=...) and give the variable's name here")
        if not ENV_NAME.match(value):
            raise ValueError(f"{value!r} is not an environment variable name (letters, digits, _), e.g. OPENAI_API_KEY")
        return value

    @model_validator(mode="after")
    def _one_judge(self):
        if self.model and self.url:
            raise KeyedValueError("eval.judge.url", "give either model (a judge tuneforge loads) or url (an "
                                  "OpenAI-compatible endpoint, with model_name), not both: remove one")
        if not self.model and not self.url:
            raise KeyedValueError("eval.judge.model", "the judge needs model (a model tuneforge loads, e.g. a hub id "
                                  "or folder) or url + model_name (an OpenAI-compatible endpoint)")
        if self.url and not self.model_name:
            raise KeyedValueError("eval.judge.model_name", "an endpoint judge needs the name of the model served at "
                                  "url, e.g. model_name: gpt-4o-mini")
        if self.model_name and not self.url:
            raise KeyedValueError("eval.judge.model_name", "model_name names the model served at url; for a model "
                                  "tuneforge loads itself, use model: instead")
        if not self.pairwise and not self.grade:
            raise KeyedValueError("eval.judge.pairwise", "with pairwise and grade both false the judge has nothing to "
                                  "do: set pairwise: true (base vs tuned) or grade: true (1-10 scores)")
        return self

    def describe(self) -> str:
        return f"{self.url} ({self.model_name})" if self.url else str(self.model)


def describe_judge_run(result: dict) -> str:
    """One line for the terminal: the tuned win rate with its interval and the bias numbers."""
    pair, parts = result.get("pairwise"), []
    if pair:
        rate = pair["tuned_win_rate"]
        if rate["decided_rate"] is not None:
            low, high = rate["ci95"]
            parts.append(f"tuned wins {rate['decided_rate']:.0f}% of decided pairs [{low:.0f}, {high:.0f}] "
                         f"({rate['wins']} won, {rate['ties']} tied, {rate['losses']} lost): {rate['verdict']}")
        else:
            parts.append(f"no decided pairs ({rate['ties']} ties)")
        for key, text in (("position_consistency", "same verdict in both orders"),
                          ("first_position_rate", "first-shown answer wins"), ("longer_preferred_rate", "longer answer wins")):
            if pair.get(key) is not None:
                parts.append(f"{text} {100 * pair[key]:.0f}%")
    for name, grade in (result.get("grades") or {}).items():
        if grade.get("mean_score") is not None:
            parts.append(f"{name} graded {grade['mean_score']:.1f}/10")
    return "; ".join(parts) or "no verdicts"
