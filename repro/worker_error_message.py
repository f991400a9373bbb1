"""Bug: an error a dataset raises in a DataLoader worker (num_workers > 0; map-style or a stream) was the one line
`the training data raised ValueError: Caught ValueError in DataLoader worker process 0. (.../torch/_utils.py:794)`:
neither the user's message nor their file:line. Run: PYTHONPATH=/tmp/hunt4 python repro/worker_error_message.py"""
import torch
from ddptrain.task import user_error


class Bad(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            raise KeyError(f"sample {i}")
        return torch.zeros(1)


for workers in (0, 1):
    try:
        list(torch.utils.data.DataLoader(Bad(), num_workers=workers))
    except Exception as e:
        print(workers, user_error(e, "the training data"))
