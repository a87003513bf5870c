"""Editing with no task training: the constraints of zero-shot editing (:mod:`.constraints`), Song et al.
2023's Algorithm 4 and its tasks (:mod:`.zero_shot`), and ``fewstep edit``'s tasks by name (:mod:`.tasks`)."""
