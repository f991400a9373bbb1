"""`wandb login` (wandb 0.31) stores the key in ~/.netrc under api.forge.coreweave.com; wandb.mode auto must
then be online, as the README says, not offline. Run with HOME set to an empty temporary directory."""
import os, tempfile
os.environ["HOME"] = tempfile.mkdtemp()
os.environ.pop("WANDB_API_KEY", None); os.environ.pop("WANDB_MODE", None); os.environ.pop("NETRC", None)
import wandb
from wandb.sdk.lib.wbauth import write_netrc_auth, read_netrc_auth
base = wandb.Settings().base_url
write_netrc_auth(host=base, api_key="fakekey0123456789fakekey0123456789fakekey01")  # what `wandb login` does
assert read_netrc_auth(host=base) is not None  # wandb itself finds the key
from ddptrain.tracking import resolve_mode
print(base, "->", resolve_mode("auto"))
assert resolve_mode("auto") == "online"
