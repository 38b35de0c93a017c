"""The web playground (serve/playground/) in a real browser: Debian's headless Chromium driven by Selenium against the
Serve application on free loopback ports (one app for the module). Upload an image, ask, move the budget and see the
plan change, `auto` with the load behind it, compare budgets with the attention overlay, and readable errors (a corrupt
image and a 401 from the real server, which has an API key; 429 + Retry-After as the server sends them). Screenshots
go to test-artifacts/playground/ (path printed at the end). Every wait ends on page state, with a bounded number of
checks."""

import io
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


ARTIFACTS = Path(os.environ.get("ADALLAVA_TEST_ARTIFACTS", "test-artifacts")).resolve() / "playground"
QUESTION = "What colour is the circle?"
KEY = "sk-test-123"  # the server's API key (ServeConfig.api_key): the page must send it, and says so when it is wrong
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def picture(path: Path):
    """A small scene: a red circle and a yellow square on blue (not square, so the centre crop matters)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (160, 120), (40, 70, 160))
    d = ImageDraw.Draw(img)
    d.ellipse((20, 25, 90, 95), fill=(220, 40, 40))
    d.rectangle((105, 40, 145, 80), fill=(240, 200, 40))
    img.save(path, "PNG")
    return path


def corrupt(path: Path):
    raw = bytearray(picture(path).read_bytes())
    raw[60:120] = b"\x00" * 60  # header intact, pixel data broken
    path.write_bytes(bytes(raw))
    return path


@pytest.fixture(scope="module")
def server():
    import ray
    from ray import serve

    from serve.app import build_app

    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # An SLO that no request on this (shared, busy) machine misses: the server's own choice stays 1.0, so the budget
    # the page asks for is the one that runs (how load lowers budgets is test_serve_app.py's subject).
    args = {"model_name": "adallava-test", "max_batch_size": 4, "min_replicas": 1, "max_replicas": 1,
            "profile_tokens": 2, "limits": {"default_max_tokens": 8}, "policy": {"slo_ms": 600_000},
            "api_key": KEY}  # fmt: skip
    serve.run(build_app(args), name="adallava", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def browser(request, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("Chromium and chromedriver are needed (Debian packages chromium, chromium-driver); `make test` "
                    "installs them")  # fmt: skip
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1360,1100",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--no-first-run"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()
    capture = request.config.pluginmanager.get_plugin("capturemanager")  # print past pytest's capture, pass or fail
    with capture.global_and_fixture_disabled():
        print(f"\nplayground screenshots: {ARTIFACTS}")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    return {"scene": picture(d / "scene.png"), "corrupt": corrupt(d / "corrupt.png")}


# ---------------------------------------------------------------------------------------------------------- helpers


def js(driver, script, *args):
    return driver.execute_script(script, *args)


def wait_for(driver, condition: str, what: str, attempts: int = 300, pause: float = 0.2):
    """Poll a JS expression until it is truthy, at most `attempts` times; fail with the page's state if never."""
    for _ in range(attempts):
        if js(driver, f"return Boolean({condition});"):
            return
        time.sleep(pause)
    shot(driver, f"timeout-{what.replace(' ', '-')}")
    state = js(driver, "return [document.body.dataset.state, document.body.dataset.runs, "
                       "document.getElementById('error').textContent];")  # fmt: skip
    raise AssertionError(f"the page never reached: {what} (state, runs, error = {state})")


def runs(driver) -> int:
    return int(js(driver, "return document.body.dataset.runs;"))


def run_and_wait(driver, button: str) -> int:
    """Click Ask or Compare and wait until that run is over (body[data-runs] moved on)."""
    before = runs(driver)
    driver.find_element("id", button).click()
    wait_for(driver, f"Number(document.body.dataset.runs) > {before} && document.body.dataset.state !== 'running'",
             f"{button} finished")  # fmt: skip
    return runs(driver)


def text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def shot(driver, name: str) -> Path:
    """The whole page: the window grows to the page's height (the viewport is the window less its frame)."""
    for _ in range(3):
        inner, height = js(driver, "return [window.innerHeight, document.documentElement.scrollHeight];")
        if inner >= height:
            break
        driver.set_window_size(1360, min(driver.get_window_size()["height"] + height - inner + 8, 3000))
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def upload(driver, path: Path):
    driver.find_element("id", "file").send_keys(str(path))
    wait_for(driver, f"document.getElementById('file-name').textContent.startsWith({path.name!r})", "file picked")


def set_mode(driver, mode: str):
    driver.find_element("css selector", f'input[name="mode"][value="{mode}"]').click()


def plan(driver, selector="#plan") -> str:
    return js(driver, "return document.querySelector(arguments[0]).dataset.plan;", selector)


def flops(driver) -> float:
    value, unit = text(driver, "flops").split()
    return float(value) * {"MFLOPs": 1e6, "GFLOPs": 1e9, "TFLOPs": 1e12}[unit]


# ---------------------------------------------------------------------------------------------------------- tests


def type_key(driver, key: str):
    box = driver.find_element("id", "api-key")
    box.clear()
    box.send_keys(key)
    driver.find_element("id", "question").click()  # leaves the key field: stored, model info reloaded


def test_page_is_open_without_the_key_and_says_the_api_needs_it(server, browser):
    """The page holds no secret (served without the key); its first API call gets the real server's 401, shown as
    a sentence; the key typed is kept in the browser and the model info loads with it."""
    browser.get(server + "/")
    wait_for(browser, "document.body.dataset.state === 'error'", "model info refused without the key")
    assert text(browser, "error") == ("401 Unauthorized: Incorrect or missing API key: send it as 'Authorization: "
                                      "Bearer <key>' — this server needs an API key: enter it in the API key field "
                                      "at the top right.")  # fmt: skip
    assert text(browser, "model-facts") == "not connected"
    shot(browser, "0-needs-the-api-key")
    type_key(browser, KEY)
    wait_for(browser, "document.body.dataset.state === 'idle'", "model info loaded with the key")
    assert js(browser, "return localStorage.getItem('adallava-api-key');") == KEY
    assert not browser.find_element("id", "error").is_displayed()


def test_page_is_served_by_the_api_and_reads_the_model(server, browser):
    import httpx

    browser.get(server + "/")  # reloaded: the key comes back from the browser's storage
    wait_for(browser, "document.body.dataset.state === 'idle'", "model info loaded")
    facts = text(browser, "model-facts")
    assert "adallava-test" in facts and "8 (4 prefix)" in facts and "layer" in facts
    slider = browser.find_element("id", "budget")
    assert [slider.get_attribute(a) for a in ("min", "max", "step")] == ["0.5", "1", "0.125"]
    # everything the page loaded came from this origin: nothing from the internet
    loaded = js(browser, "return performance.getEntriesByType('resource').map(e => e.name);")
    assert loaded and all(u.startswith(server + "/") for u in loaded), loaded
    assert httpx.get(server + "/playground").text == httpx.get(server + "/").text
    assert httpx.get(server + "/playground/nope.js").status_code == 404


def test_upload_ask_and_the_answer_streams(server, browser, files):
    import httpx

    upload(browser, files["scene"])
    q = browser.find_element("id", "question")
    q.clear()
    q.send_keys(QUESTION)
    assert run_and_wait(browser, "ask") == 1
    assert js(browser, "return document.body.dataset.state;") == "done", text(browser, "error")
    answer = js(browser, "return document.getElementById('answer').textContent;")
    assert int(js(browser, "return document.getElementById('answer').dataset.chunks;")) >= 1
    assert plan(browser) == "PPPP####"  # budget 1.0: every layer after the 4 prefix layers ran
    assert flops(browser) > 0 and "budget 1.000" in text(browser, "budget-used")
    lat = text(browser, "latency-text")
    assert "queue" in lat and "prefill" in lat and "decode" in lat
    assert len(browser.find_elements("css selector", "#latency-bar .seg")) == 3
    # what streamed is what the API answers to the same request (greedy)
    import base64

    url = "data:image/png;base64," + base64.b64encode(files["scene"].read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    r = httpx.post(server + "/v1/chat/completions", timeout=60, headers=AUTH,
                   json={"max_tokens": 24, "budget": 1.0, "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200
    full = r.json()["choices"][0]["message"]["content"] or "(empty answer)"
    # the stream holds back a tail that is not yet whole UTF-8 (the tiny random model emits byte tokens)
    assert answer == full or (full.startswith(answer) and set(full[len(answer):]) == {"\ufffd"}), (answer, full)
    shot(browser, "1-ask-full-budget")


def test_moving_the_budget_changes_the_plan(browser):
    from selenium.webdriver.common.keys import Keys

    full = flops(browser)
    slider = browser.find_element("id", "budget")
    slider.send_keys(Keys.HOME)  # the keyboard, as a person would: to the lowest budget
    assert text(browser, "budget-value") == "0.500"
    run_and_wait(browser, "ask")
    assert plan(browser) == "PPPP...."  # only the prefix layers at the floor budget
    assert flops(browser) < full
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)  # two plan steps up
    assert text(browser, "budget-value") == "0.750"
    run_and_wait(browser, "ask")
    p = plan(browser)
    assert p[:4] == "PPPP" and p[4:].count("#") == 2 and p[4:].count(".") == 2, p
    assert len(browser.find_elements("css selector", "#plan rect[data-state=skip]")) == 2
    shot(browser, "2-ask-budget-0.75")


def test_auto_shows_the_load_behind_the_choice(browser):
    set_mode(browser, "auto")
    run_and_wait(browser, "ask")
    assert js(browser, "return document.body.dataset.state;") == "done", text(browser, "error")
    assert text(browser, "budget-used") == "budget 1.000 (chosen by the server)"
    assert plan(browser) == "PPPP####"
    load = text(browser, "load")
    assert load.startswith("server's load-aware budget 1.000 for a 600000 ms deadline at ") and "requests per replica" in load
    assert "on 1 replica;" in load and "load from load_board" in load


def test_latency_target(browser):
    set_mode(browser, "latency")
    box = browser.find_element("id", "latency")
    box.clear()
    box.send_keys("1")  # 1 ms: below what the model reaches even alone at the floor budget: a 400 naming the range
    run_and_wait(browser, "ask")
    assert js(browser, "return document.body.dataset.state;") == "error"
    assert text(browser, "error").startswith("400 Bad request: latency_ms=1 is below what this model can reach")
    assert "the achievable range is" in text(browser, "error")
    box.clear()
    box.send_keys("300000")  # reachable: it becomes the request's deadline (tighter than the 600 s SLO)
    run_and_wait(browser, "ask")
    assert "budget 1.000 (for a 300000 ms target)" == text(browser, "budget-used")
    assert plan(browser) == "PPPP####"


def test_compare_budgets_side_by_side_with_attention(browser):
    set_mode(browser, "budget")
    box = browser.find_element("id", "compare-budgets")
    box.clear()
    box.send_keys("0.6, 0.85, 1.0")
    run_and_wait(browser, "compare")
    assert js(browser, "return document.body.dataset.state;") == "done", text(browser, "error")
    cards = browser.find_elements("css selector", "#compare-cards .card")
    assert [c.get_attribute("data-budget") for c in cards] == ["0.6", "0.85", "1.0"]
    assert [c.get_attribute("data-state") for c in cards] == ["done"] * 3
    # budgets fall to their plan steps (0.5, 0.75, 1.0): 0, 2 and 4 of the 4 schedulable layers run
    plans = [plan(browser, f'#compare-cards .card[data-budget="{b}"] .card-plan') for b in ("0.6", "0.85", "1.0")]
    assert plans == ["PPPP....", plans[1], "PPPP####"] and plans[1][4:].count("#") == 2, plans
    assert [c.find_element("css selector", ".card-stats").text.split(" ·")[0] for c in cards] == [
        "4 of 8 layers ran", "6 of 8 layers ran", "8 of 8 layers ran"]
    # the overlay is drawn: the canvas holds the image under a heat map whose cells differ
    distinct = js(browser, """
        const c = document.querySelector('#compare-cards .card canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        for (let i = 0; i < d.length; i += 4 * 97) seen.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]);
        return seen.size;""")  # fmt: skip
    assert distinct > 8, distinct
    assert "attention per patch (4×4, layer 3)" in cards[0].text
    path = shot(browser, "3-compare-budgets")
    if os.environ.get("ADALLAVA_UPDATE_DOCS"):  # refresh the README's picture: ADALLAVA_UPDATE_DOCS=1 pytest ...
        shutil.copy(path, Path(__file__).resolve().parents[2] / "docs" / "playground.png")


def test_a_corrupt_image_gives_a_readable_error(browser, files):
    upload(browser, files["corrupt"])
    run_and_wait(browser, "ask")
    assert js(browser, "return document.body.dataset.state;") == "error"
    error = browser.find_element("id", "error")
    assert error.is_displayed()
    assert error.text.startswith("400 Bad request: messages.0.content.0.image_url.url: corrupt or truncated image")
    assert plan(browser) is None and text(browser, "flops") == "–"  # the previous answer's figures are gone
    shot(browser, "4-corrupt-image")


def test_api_key_is_sent_and_401_and_429_read_as_sentences(browser, files):
    """The key typed is sent as a bearer token; a wrong key gets the real server's 401, as a sentence. A 429 with
    Retry-After cannot be produced on demand by the real server (admission depends on the measured load and an idle
    replica always admits), so those bodies come from a stand-in for fetch in the page, the same the API sends."""
    upload(browser, files["scene"])
    type_key(browser, "sk-wrong")
    wait_for(browser, "document.body.dataset.state === 'error'", "model info refused with a wrong key")
    run_and_wait(browser, "ask")  # the real server refuses the chat request too
    assert text(browser, "error") == ("401 Unauthorized: Incorrect or missing API key: send it as 'Authorization: "
                                      "Bearer <key>' — this server needs an API key: enter it in the API key field "
                                      "at the top right.")  # fmt: skip
    assert plan(browser) is None
    shot(browser, "5-wrong-api-key")
    type_key(browser, KEY)
    wait_for(browser, "document.body.dataset.state === 'idle'", "model info reloaded with the key")
    js(browser, """
        window.__seen = [];
        const real = window.fetch;
        window.__reply = null;
        window.fetch = (url, init) => {
          window.__seen.push((init && init.headers && init.headers.Authorization) || null);
          if (window.__reply && String(url).includes('/v1/chat/completions')) {
            const [status, body, headers] = window.__reply;
            return Promise.resolve(new Response(JSON.stringify(body), {status, headers}));
          }
          return real(url, init);
        };""")  # fmt: skip
    run_and_wait(browser, "ask")  # the real server, with the key in the header
    assert js(browser, "return window.__seen;") == [f"Bearer {KEY}"]
    assert js(browser, "return document.body.dataset.state;") == "done", text(browser, "error")
    js(browser, "window.__reply = [429, {error: {message: 'overloaded: even the lowest budget (0.5) cannot meet the "
                "1000 ms target at this load; retry after 2 s', type: 'rate_limit_error', param: null, "
                "code: 'overloaded'}}, {'Retry-After': '2'}];")  # fmt: skip
    run_and_wait(browser, "ask")
    assert text(browser, "error") == ("429 Too many requests: overloaded: even the lowest budget (0.5) cannot meet the "
                                      "1000 ms target at this load; retry after 2 s")  # fmt: skip
    shot(browser, "6-rate-limited")
    js(browser, "window.__reply = [429, {error: {message: 'slow down', type: 'rate_limit_error', param: null, "
                "code: 'rate_limited'}}, {'Retry-After': '5'}];")  # fmt: skip
    run_and_wait(browser, "ask")  # a message that does not say when: the Retry-After header does
    assert text(browser, "error") == "429 Too many requests: slow down — retry after 5 s."


def test_head_granularity_plans_are_drawn_per_head_and_neuron_group(browser):
    """The picture for AdaLLaVA-H (this module's server is layer granularity): the page's own renderPlan on a
    response shaped like a head-granularity one: 2 prefix layers, 2 schedulable layers of 2 units each."""
    cells = js(browser, """
        const saved = state.info;
        state.info = {...saved, granularity: 'head', num_prefix_layers: 2};
        const box = document.createElement('div');
        renderPlan(box, {execution_plan: [1, 1, 0.5, 0],
                         execution_units: [[[1, 0], [0, 1]], [[0, 0], [0, 0]]]}, false);
        state.info = saved;
        return [box.dataset.plan, Array.from(box.querySelectorAll('rect')).map(
            r => r.dataset.layer + ':' + r.dataset.state)];""")  # fmt: skip
    text_plan, rects = cells
    assert text_plan == "PP+."
    # 4 rows (2 head units, 2 MLP groups) per layer; layer 2 ran head unit 0 and MLP group 1
    assert rects == ["0:prefix"] * 4 + ["1:prefix"] * 4 + ["2:run", "2:skip", "2:skip", "2:run"] + ["3:skip"] * 4


def test_api_attention_and_execution_units(server, files):
    """What the page draws, from the API itself: the opt-in attention map and the switches of each layer."""
    import base64

    import httpx

    url = "data:image/png;base64," + base64.b64encode(files["scene"].read_bytes()).decode()
    body = {"max_tokens": 2, "budget": 0.75, "adallava": {"attention": True}, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}]}
    ada = httpx.post(server + "/v1/chat/completions", json=body, timeout=60, headers=AUTH).json()["adallava"]
    att = ada["attention"]
    assert att["layer"] == 3 and att["region"] == "center_square"
    assert len(att["grid"]) == 4 and all(len(row) == 4 for row in att["grid"])
    assert abs(sum(map(sum, att["grid"])) - 1) < 1e-3 and min(map(min, att["grid"])) > 0
    units = ada["execution_units"]  # [schedulable layers][attention, MLP][units]
    assert len(units) == 4
    assert [int(all(u[0]) and all(u[1])) for u in units] == [int(x) for x in ada["execution_plan"][4:]]
    without = httpx.post(server + "/v1/chat/completions", json={**body, "adallava": {}}, timeout=60,
                         headers=AUTH).json()["adallava"]
    assert "attention" not in without
    bad = httpx.post(server + "/v1/chat/completions", json={**body, "adallava": {"attention": "yes"}}, timeout=60,
                     headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "adallava.attention"
