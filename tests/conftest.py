import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

# The suite must behave the same on a 2-core CI machine and a big workstation.
torch.set_num_threads(min(2, torch.get_num_threads()))
