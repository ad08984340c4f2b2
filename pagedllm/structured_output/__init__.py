"""Structured outputs: grammars that constrain what a request may sample (vLLM's feature).

``backend`` wraps the grammar library (xgrammar): it checks a spec at the door, compiles it
against the model's vocabulary and steps one matcher per request. ``manager`` is the engine
core's side: compiles off the step loop, keeps each request's matcher in step with its tokens and
fills one token bitmask per step for the rows that need it; ``bitmask`` holds that step's mask
(plain numpy: it crosses to the runner in the ``SchedulerOutput``). The sampler applies it.
"""
