"""Loss-weight sweeps with Ray Tune: ``tune`` (``a2b tune``) runs one, ``space`` holds its search
space and base config, ``summary`` its table, best.yaml and plot, ``trial`` what runs inside each Ray
trial. Ray is imported only inside functions: the [sweeps] extra is needed to run a sweep, not to
import these modules."""
