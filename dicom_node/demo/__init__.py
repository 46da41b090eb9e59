"""``dicom-node demo``: the whole pipeline on synthetic data, end to end, in minutes.

One module per step: ``cohort`` (generate, hold out, training set), ``train``, ``pacs`` and
``node`` (the demo PACS and ``dicom-node serve`` as child processes), ``push``, ``collect``
(results read back from the PACS with highdicom) and ``table``; ``run`` puts them in order.
"""

from dicom_node.demo.run import DemoOptions, demo_command, run_demo

__all__ = ["DemoOptions", "demo_command", "run_demo"]
