"""Content rules (CONTENT_RULES_FILE): words, phrases and patterns a question may not contain and an answer never
shows: the question is refused, the answer's matches masked before any poll, frame or message shows them."""
