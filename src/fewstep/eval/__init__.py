"""The ruler every method is judged by: sample-quality metrics on classifier features (:mod:`.metrics`),
scoring a model at its step counts (:mod:`.evaluate`), and the editing measurements (:mod:`.editing`)."""
