"""Images for vision-language models: resize rules, token counts, preprocessing."""
