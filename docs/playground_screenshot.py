"""Take the README's picture of the playground (docs/playground.png): serve a model on free loopback ports, open the
page in headless Chromium (Selenium, the dev extra; Debian's chromium + chromium-driver), upload an image, ask, compare
budgets, and save the whole page.

    python docs/playground_screenshot.py --model runs/<adapt run>/checkpoint_<step> \\
        --image data/bundled/images/test-00238.png --question "What colour is the shape?"
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--image", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--budgets", default="0.6, 0.85, 1.0")
    ap.add_argument("--budget-steps-down", type=int, default=1, help="slider steps below 1.0 for the Ask panel")
    ap.add_argument("--slo-ms", type=float, default=600_000, help="policy.slo_ms: large = the asked budgets run")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "playground.png"))
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.keys import Keys

    from serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"model": args.model, "min_replicas": 1, "max_replicas": 1, "profile_tokens": 2,
                     "policy": {"slo_ms": args.slo_ms}})  # fmt: skip
    serve.run(app, name="adallava", route_prefix="/")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1360,1000"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)

    def wait(cond, attempts=600):
        for _ in range(attempts):
            if driver.execute_script(f"return Boolean({cond});"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"page never reached {cond}")

    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait("document.body.dataset.state === 'idle'")
        driver.find_element("id", "file").send_keys(str(Path(args.image).resolve()))
        wait("document.getElementById('file-name').textContent !== ''")
        q = driver.find_element("id", "question")
        q.clear()
        q.send_keys(args.question)
        driver.find_element("id", "budget").send_keys(*[Keys.ARROW_LEFT] * args.budget_steps_down)
        for button, n in (("ask", 1), ("compare", 2)):
            if button == "compare":
                box = driver.find_element("id", "compare-budgets")
                box.clear()
                box.send_keys(args.budgets)
            driver.find_element("id", button).click()
            wait(f"Number(document.body.dataset.runs) >= {n} && document.body.dataset.state !== 'running'")
        for _ in range(3):
            inner, height = driver.execute_script("return [innerHeight, document.documentElement.scrollHeight];")
            if inner >= height:
                break
            driver.set_window_size(1360, driver.get_window_size()["height"] + height - inner + 8)
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
