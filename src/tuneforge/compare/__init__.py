"""The compare room: `tuneforge compare RECIPE --methods lora,qlora,dora,ia3,...` -- the same data and budget through
each adaptation method, each its own run, and one report of what each costs and what it gains (seed 000 step 10:
"all methods side by side, concrete numbers, not vibes").

  menu.py      the method names compare takes and the adapter: section each one means
  runs.py      the per-method recipes (checked before anything trains) and the runs, one process each (its peak
               memory: CUDA's peak when on a GPU, else the process's peak resident memory)
  report.py    the table (markdown, HTML, JSON) and the plots (matplotlib) from the runs' summary.json
  commands.py  register(app): the `compare` command, added to the `tuneforge` app by cli.py
"""
