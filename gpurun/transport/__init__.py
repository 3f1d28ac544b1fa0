"""How gpurun reaches a machine: a local subprocess or an SSH connection."""
