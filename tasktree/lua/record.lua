-- After a model call whose step's outcome is stored later (a decision): record its usage and
-- keep its reply until then (record_call in _lib.lua says how).
-- KEYS: tree, node, claim
-- ARGV: step, model, prompt_tokens, completion_tokens, cost_usd, cost_unknown (0/1), latency,
--       token, text, call id
return record_call(KEYS[1], KEYS[2], KEYS[3], ARGV, true)
