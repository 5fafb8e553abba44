"""Where images come from: each source turns its input into role specs (samples per role) that
``a2b_dist.data.write.write_roles`` writes as shards.

- ``folders``: a folder of image files with a labels CSV, an .npz of arrays (MedMNIST), and the
  labels-CSV and split parsing the medical sources share;
- ``medical``: DICOM and NIfTI ingestion, split by patient or volume;
- ``simulate``: the simulated protocols (MNIST, the phantom, the CT head) with their anomalies;
- ``phantom`` and ``cthead``: the two heads; ``anomalies``: the anomaly kinds.

Sources may import the shard format (``a2b_dist.data``); the shard format never imports a source.
Errors about an argument are ``FieldError``s naming the argument; the CLI turns them into its flags.
"""
