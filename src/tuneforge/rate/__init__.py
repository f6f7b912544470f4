"""The rate room: people judge base vs tuned answers, blind (`tuneforge rate RUN`, `tuneforge rate RUN --import FILE`).

  sheet.py     the blind A/B sheet (self-contained HTML + CSV) and its key, eval/rate_key.json
  ratings.py   the filled sheet read back: the tuned win rate with its interval, the LLM judge's agreement with the
               people (eval/human_ratings.json)
  commands.py  register(app): the `rate` command, added to the `tuneforge` app by cli.py
"""
