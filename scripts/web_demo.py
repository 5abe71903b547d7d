"""The chat page in your browser, as MiniMind's ``web_demo.py`` was: the OpenAI-compatible server with
``--open_browser``.  网页对话：启动服务并打开浏览器。

    python scripts/web_demo.py --weight full_sft          # serves http://127.0.0.1:8998/ and opens it

Every flag of scripts/serve_openai_api.py works here (``--port``, ``--api_key``, ``--load_from``, ...).
"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv.append("--open_browser")
    # run the server as a script rather than import it: scripts do not import one another
    runpy.run_path(str(Path(__file__).with_name("serve_openai_api.py")), run_name="__main__")
