"""The web interface in a real browser: Debian's headless chromium driven by Selenium,
against a whole appliance (nginx TLS, registry, auth service) on a temporary root.

The browser trusts the appliance's certificate through its own NSS database
(tests/support/browser.py): TLS verification stays on. One appliance serves the module;
the tests run in order as one story (sign in, browse to a tag skopeo pushed, copy the
pull command, delete as maintainer, the reporter's view), then the security checks. Every
page visited is screenshotted into the run's tmp directory (SCREENSHOTS) and checked by
axe-core (from npm, installed by ./bootstrap) for accessibility violations.
"""

from __future__ import annotations

import base64
import http.server
import json
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.appliance import ApplianceUnderTest, team_app_appliance
from tests.support.browser import AXE, start_browser
from tests.support.oci import build_image, build_index
from tests.support.skopeo import SkopeoError

PASSWORDS = {"maint": "maintainer password 1", "rep": "reporter password 1"}
SCRIPT = "<script>window.injected = 1</script>"
IMG = '"><img src=x onerror="window.injected = 2">'


@pytest.fixture(scope="module")
def appliance():
    roles = {"maint": "maintainer", "rep": "reporter"}
    members = {name: (PASSWORDS[name], role) for name, role in roles.items()}
    with team_app_appliance("appliance-web-", members) as appliance:
        yield appliance


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


class Browser:
    """One signed-in user's browser, with the checks every page gets."""

    def __init__(
        self,
        appliance: ApplianceUnderTest,
        workdir: Path,
        screenshots: Path,
        javascript: bool = True,
    ) -> None:
        self.appliance, self.screenshots = appliance, screenshots
        self.driver = start_browser(workdir, appliance.certificate, javascript=javascript)
        self.base = f"https://{appliance.registry_address}"

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def shot(self, name: str) -> Path:
        target = self.screenshots / f"{name}.png"
        self.driver.save_screenshot(str(target))
        return target

    def check(self, name: str) -> None:
        """Screenshot, nothing injected ran, and axe-core finds no violation."""
        self.shot(name)
        assert self.driver.execute_script("return window.injected || null") is None
        assert not self.driver.find_elements("css selector", "img")
        violations = axe_violations(self.driver)
        assert violations == [], f"{name}: {json.dumps(violations, indent=1)}"

    def sign_in(self, username: str, password: str) -> None:
        self.open("/")
        assert self.driver.current_url.startswith(self.base + "/sign-in")
        self.driver.find_element("id", "username").send_keys(username)
        self.driver.find_element("id", "password").send_keys(password)
        self.submit("css selector", "main form button[type=submit]")
        assert self.driver.current_url == self.base + "/", self.text()

    def submit(self, by: str, value: str) -> None:
        """Click a button or link that loads a page, and wait until the new one is there."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.wait import WebDriverWait

        old = self.driver.find_element("tag name", "html")
        self.driver.find_element(by, value).click()

        def replaced(_driver) -> bool:
            try:
                old.is_enabled()  # raises once the page it belonged to is gone
            except WebDriverException:  # stale, or "does not belong to the document"
                return True
            return False

        WebDriverWait(self.driver, 15).until(replaced)

    def text(self) -> str:
        return self.driver.find_element("tag name", "main").text

    def click_link(self, text: str) -> None:
        self.submit("link text", text)

    def session_cookie(self) -> str:
        cookie = self.driver.get_cookie("__Host-appliance-session")
        assert cookie is not None
        assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Lax"
        return cookie["value"]

    def quit(self) -> None:
        self.driver.quit()


def axe_violations(driver) -> list[dict]:
    """axe-core's violations on the current page (id, impact, the elements' HTML)."""
    if not AXE.exists():
        pytest.fail(f"axe-core is missing at {AXE}; run ./bootstrap --deps-only")
    driver.execute_script(AXE.read_text())
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']})"
        ".then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact,"
        " nodes: v.nodes.map(n => n.html)}))), e => done([{id: 'axe failed: ' + e}]));"
    )
    return result


@pytest.fixture(scope="module")
def root(appliance, tmp_path_factory, screenshots):
    browser = Browser(appliance, tmp_path_factory.mktemp("root-browser"), screenshots)
    browser.sign_in("root", appliance.password)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def maint(appliance, tmp_path_factory, screenshots):
    browser = Browser(appliance, tmp_path_factory.mktemp("maint-browser"), screenshots)
    browser.sign_in("maint", PASSWORDS["maint"])
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def rep(appliance, tmp_path_factory, screenshots):
    browser = Browser(appliance, tmp_path_factory.mktemp("rep-browser"), screenshots)
    browser.sign_in("rep", PASSWORDS["rep"])
    yield browser
    browser.quit()


def http_request(
    appliance: ApplianceUnderTest,
    method: str,
    path: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict, str]:
    """(status, headers, body) of one request through nginx, redirects not followed."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    context = ssl.create_default_context(cafile=str(appliance.certificate))
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), NoRedirect())
    request = urllib.request.Request(
        f"https://{appliance.registry_address}{path}",
        data=data,
        method=method,
        headers=headers or {},
    )
    try:
        with opener.open(request, timeout=30) as reply:
            return reply.status, dict(reply.headers), reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


# ---------------------------------------------------------------- the admin's pages


def test_admin_pages_and_free_text_rendered_as_text(appliance, root) -> None:
    """The admin gives the reporter a hostile display name and the project a hostile
    description, through the pages; every page then shows them as text."""
    root.open("/admin/users")
    root.check("admin-users")
    root.driver.find_element("id", "new-username").send_keys("eve")
    root.driver.find_element("id", "new-display-name").send_keys(SCRIPT + IMG)
    root.driver.find_element("id", "new-password").send_keys("eve's password 1")
    root.submit("xpath", "//button[text()='Create user']")
    assert "User eve was created." in root.text()
    assert SCRIPT + IMG in root.text()
    root.check("admin-users-created")

    root.open("/admin/projects")
    field = root.driver.find_element("css selector", "input[name=description]")
    field.send_keys(SCRIPT + IMG)
    root.submit("css selector", "button[aria-label^='Save the description']")
    assert "The description of team/app was saved." in root.text()
    root.check("admin-projects")

    root.open("/")
    assert SCRIPT + IMG in root.text()
    root.check("projects")
    appliance.ctl("member", "add", "team/app", "eve", "guest")
    root.open("/projects/team/app/-/members")
    assert SCRIPT + IMG in root.text()
    root.check("members")


# ---------------------------------------------------------------- tokens


def test_personal_access_token_created_in_the_page_works_with_skopeo(
    appliance, maint, tmp_path
) -> None:
    maint.open("/tokens")
    maint.check("tokens")
    maint.driver.find_element("id", "token-name").send_keys("laptop")
    maint.driver.find_element("id", "scope-write_registry").click()
    maint.submit("xpath", "//button[text()='Create personal access token']")
    assert "was created" in maint.text(), maint.text()
    secret = maint.driver.find_element("id", "new-token").get_attribute("value")
    assert secret and "laptop" in maint.text()
    maint.check("token-created")

    image = build_image(tmp_path / "layout", "v1")
    client = appliance.skopeo(tmp_path / "client", "maint", secret)
    client.push(image, "team/app/web", "v1")
    assert client.list_tags("team/app/web") == ["v1"]

    maint.open("/tokens")
    assert secret not in maint.driver.page_source  # shown once
    maint.submit("css selector", "button[aria-label='Revoke laptop']")
    assert "was revoked" in maint.text()
    with pytest.raises(SkopeoError):
        appliance.skopeo(tmp_path / "client2", "maint", secret).list_tags("team/app/web")


# ---------------------------------------------------------------- browsing, deleting


@pytest.fixture(scope="module")
def pushed(appliance, tmp_path_factory) -> dict:
    """What root pushed with skopeo: team/app/web:v2 (one platform), :multi (two)."""
    work = tmp_path_factory.mktemp("pushed")
    client = appliance.skopeo(work / "client")
    image = build_image(work / "layout", "v2", random_bytes=300_000)
    client.push(image, "team/app/web", "v2")
    appliance.ctl("usage")  # the figures, and a point of the usage history
    index = build_index(work / "index", "multi")
    client.push_all(index, "team/app/web", "multi")
    client.push(build_image(work / "big", "big", random_bytes=600_000), "team/app/big", "v1")
    client.push(build_image(work / "release", "release"), "team/app/web", "release")
    appliance.ctl("project", "update", "team/app", "--protected-tags", "release=owner")
    appliance.ctl("usage")  # a second point
    return {
        "v2": client.digest("team/app/web", "v2"),
        "multi": index.index_digest,
        "multi_children": {p: child.manifest_digest for p, child in index.children.items()},
        "client": client,
    }


def test_browse_to_a_tag_and_copy_the_pull_command(appliance, maint, pushed) -> None:
    maint.open("/")
    maint.click_link("team/app")
    assert "team/app/web" in maint.text() and "team/app/big" in maint.text()
    assert len(maint.driver.find_elements("css selector", "svg.chart circle")) >= 2
    maint.check("project")
    maint.click_link("team/app/web")
    rows = {
        row.find_element("css selector", "td a").text: row.text
        for row in maint.driver.find_elements("css selector", "table.tags tbody tr")
    }
    assert set(rows) >= {"v1", "v2", "multi"}
    assert pushed["v2"][:19] in rows["v2"] and "linux/amd64" in rows["v2"]
    assert "by root" in rows["v2"]
    assert "linux/amd64, linux/arm64" in rows["multi"]
    # No client pulled multi: the pages' own reads of it are not pulls.
    assert "never" in rows["multi"]
    maint.check("tags")
    maint.click_link("v2")
    field = maint.driver.find_element("id", "pull-command")
    command = f"docker pull {appliance.registry_address}/team/app/web:v2"
    assert field.get_attribute("value") == command
    assert pushed["v2"] in maint.text()
    maint.check("tag")
    maint.driver.execute_cdp_cmd(
        "Browser.grantPermissions",
        {"origin": maint.base, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    button = maint.driver.find_element("css selector", "button[aria-label='Copy Pull command']")
    button.click()
    from selenium.webdriver.support.wait import WebDriverWait

    WebDriverWait(maint.driver, 10).until(lambda driver: button.text == "Copied")
    copied = maint.driver.execute_async_script(
        "const done = arguments[0];"
        "navigator.clipboard.readText().then(done, e => done('failed: ' + e));"
    )
    assert copied == command


def test_a_multi_platform_tag_shows_each_platforms_manifest(appliance, maint, pushed) -> None:
    maint.open("/repositories/team/app/web/-/tags/multi")
    assert pushed["multi"] in maint.text()
    rows = [
        row.text for row in maint.driver.find_elements("css selector", "table.manifests tbody tr")
    ]
    assert len(rows) == 2
    for (platform, digest), row in zip(pushed["multi_children"].items(), rows, strict=True):
        assert row.startswith(f"{platform} {digest} ")
        assert f"docker pull {appliance.registry_address}/team/app/web@{digest}" in row
    maint.check("tag-index")
    maint.open("/repositories/team/app/web/-/tags/v2")  # an image: no such table
    assert not maint.driver.find_elements("css selector", "table.manifests")


def test_maintainer_deletes_a_tag(appliance, maint, pushed) -> None:
    maint.open("/repositories/team/app/web")
    maint.submit("css selector", "button[aria-label='Delete tag v2']")
    assert "Tag v2 was deleted" in maint.text()
    assert "v2" not in pushed["client"].list_tags("team/app/web")
    maint.check("tag-deleted")
    # A tag protected above the maintainer's role: refused with the tag rules' sentence,
    # as skopeo delete would be.
    maint.submit("css selector", "button[aria-label='Delete tag release']")
    assert "protected" in maint.text() and "release" in maint.text()
    assert "release" in pushed["client"].list_tags("team/app/web")


def test_reporter_sees_no_delete_control_and_may_not_delete(appliance, rep, pushed) -> None:
    rep.open("/repositories/team/app/web")
    assert "multi" in rep.text()
    assert not [
        button
        for button in rep.driver.find_elements("tag name", "button")
        if "Delete" in button.text
    ]
    rep.check("tags-reporter")
    token = rep.driver.find_element("name", "csrf_token").get_attribute("value")
    status, _, body = http_request(
        appliance,
        "POST",
        "/repositories/team/app/web/-/tags/multi/delete",
        f"csrf_token={token}".encode(),
        {
            "Cookie": f"__Host-appliance-session={rep.session_cookie()}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Origin": rep.base,
        },
    )
    assert status == 403 and "You may not delete team/app/web" in body
    # The same request through the admin API: the same operation, the same 403.
    basic = base64.b64encode(f"rep:{PASSWORDS['rep']}".encode()).decode()
    status, _, body = http_request(
        appliance,
        "DELETE",
        "/api/v1/repositories/team%2Fapp%2Fweb/tags/multi",
        headers={"Authorization": f"Basic {basic}"},
    )
    assert status == 403 and "You may not delete team/app/web" in body
    assert "multi" in pushed["client"].list_tags("team/app/web")


def test_reading_works_without_javascript_and_by_keyboard(
    appliance, pushed, tmp_path, screenshots
) -> None:
    from selenium.webdriver.common.keys import Keys

    browser = Browser(appliance, tmp_path / "no-js", screenshots, javascript=False)
    try:
        browser.open("/")
        username = browser.driver.find_element("id", "username")
        assert browser.driver.switch_to.active_element == username  # autofocus
        username.send_keys("rep", Keys.TAB, PASSWORDS["rep"], Keys.ENTER)
        from selenium.webdriver.support.wait import WebDriverWait

        WebDriverWait(browser.driver, 15).until(
            lambda driver: driver.current_url == browser.base + "/"
        )
        browser.open("/repositories/team/app/web/-/tags/multi")
        field = browser.driver.find_element("id", "pull-command")
        assert field.get_attribute("value").endswith("/team/app/web:multi")
        assert not browser.driver.find_elements("css selector", "button.copy")
        browser.shot("tag-without-javascript")
    finally:
        browser.quit()


def test_deploy_token_made_by_the_maintainer_pulls(appliance, maint, pushed, tmp_path) -> None:
    maint.open("/projects/team/app/-/deploy-tokens")
    maint.driver.find_element("id", "token-name").send_keys("ci")
    maint.submit("xpath", "//button[text()='Create deploy token']")
    username = maint.driver.find_element("id", "new-token-username").get_attribute("value")
    secret = maint.driver.find_element("id", "new-token").get_attribute("value")
    maint.check("deploy-tokens")
    client = appliance.skopeo(tmp_path / "deploy", username, secret)
    assert "multi" in client.list_tags("team/app/web")


def test_garbage_collection_page(appliance, root) -> None:
    root.open("/admin/gc")
    assert "Garbage collection" in root.text()
    root.check("admin-gc")


# ---------------------------------------------------------------- security


def test_cross_site_form_post_is_refused(appliance, maint, tmp_path) -> None:
    """A page on another origin posts a token form to the appliance in the signed-in
    browser: refused with 403, no token made. Then the same post with the session
    cookie but without the CSRF token (a browser ignoring SameSite): 403 too."""
    (tmp_path / "attack.html").write_text(
        "<!doctype html><title>attack</title><body>"
        f'<form id="f" method="post" action="https://{appliance.registry_address}/tokens">'
        '<input name="name" value="stolen"><input name="scopes" value="write_registry">'
        "</form><script>document.getElementById('f').submit()</script>"
    )

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        maint.driver.get(f"http://127.0.0.1:{server.server_address[1]}/attack.html")
        from selenium.webdriver.support.wait import WebDriverWait

        WebDriverWait(maint.driver, 15).until(
            lambda driver: (
                driver.current_url.startswith(maint.base)
                and driver.find_elements("tag name", "main")
            )
        )
        assert "CSRF" in maint.text()
        maint.shot("csrf-refused")
    finally:
        server.shutdown()
    cookie = maint.session_cookie()
    status, _, body = http_request(
        appliance,
        "POST",
        "/tokens",
        b"name=stolen&scopes=write_registry",
        {
            "Cookie": f"__Host-appliance-session={cookie}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert status == 403 and "CSRF" in body
    maint.open("/tokens")
    assert "stolen" not in maint.text()


def test_session_ends_when_the_password_changes(appliance, root, tmp_path, screenshots) -> None:
    browser = Browser(appliance, tmp_path / "eve-browser", screenshots)
    try:
        browser.sign_in("eve", "eve's password 1")
        cookie = browser.session_cookie()
        headers = {"Cookie": f"__Host-appliance-session={cookie}"}
        assert http_request(appliance, "GET", "/tokens", headers=headers)[0] == 200
        root.open("/admin/users")
        root.driver.find_element("id", "password-eve").send_keys("eve's new password")
        root.submit("css selector", "button[aria-label='Set the password of eve']")
        assert "The password of eve was changed" in root.text()
        status, reply_headers, _ = http_request(appliance, "GET", "/tokens", headers=headers)
        assert status == 303 and reply_headers["Location"].startswith("/sign-in")
        browser.open("/tokens")
        assert browser.driver.current_url.startswith(browser.base + "/sign-in")
        browser.check("sign-in")
    finally:
        browser.quit()
