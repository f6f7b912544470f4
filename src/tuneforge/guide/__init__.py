"""Guard rails before a run: `doctor` (preflight checks), `plan` (memory and time estimate), `recommend` (decision
tree that ends in a recipe). Nothing heavy is imported here; each module imports torch/transformers inside the
functions that need them.

    from tuneforge.guide.doctor import doctor_recipe, run_doctor, render_findings
    from tuneforge.guide.plan import make_plan, plan_memory, largest_batch, render_plan
    from tuneforge.guide.recommend import recommend, recommend_interactive
"""
