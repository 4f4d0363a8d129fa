"""The course machinery, beside the reference implementation (which never imports it).

- :mod:`~minipipe.course.checks`: the exercise checks, one module per exercise.
- :mod:`~minipipe.course.grade`: ``python -m minipipe grade``: runs exercise notebooks, scores them.
- :mod:`~minipipe.course.widgets`, :mod:`~minipipe.course.explorers`: the lessons' interactive
  explorers (simulated figures).
- :mod:`~minipipe.course.report`: the verification checkpoint at the end of each lesson.
- :mod:`~minipipe.course.corpus`: the capstone's generated text corpus.
"""
