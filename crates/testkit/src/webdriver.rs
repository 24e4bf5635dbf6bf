//! A small W3C WebDriver client, for the browser tests of the web console:
//! it starts Debian's `chromedriver` on a free port, opens one headless
//! Chromium session, and speaks the protocol's JSON over HTTP (ureq).
//!
//! Only what the tests use: navigate, find elements by CSS selector,
//! click, type, read text and attributes, run a script, read an alert.
//! The driver and its browser are stopped when the [`Browser`] is dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The key under which W3C WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where Debian installs the browser and its driver.
pub const CHROMIUM: &str = "chromium";
pub const CHROMEDRIVER: &str = "chromedriver";

/// An error of the driver: the W3C `error` code and its message.
#[derive(Debug, Clone)]
pub struct DriverError {
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

/// One headless Chromium, driven by its own chromedriver.
pub struct Browser {
    driver: Child,
    base: String,
    agent: ureq::Agent,
}

/// An element of the page, by the driver's reference.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Browser {
    /// Starts chromedriver and a headless Chromium session with a window of
    /// 1400×1000. Panics with the driver's answer if either fails to start.
    pub fn start() -> Browser {
        let [port] = crate::free_ports::<1>();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build();
        let mut b = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            agent,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = b
                .agent
                .get(&format!("{}/status", b.base))
                .call()
                .ok()
                .and_then(|r| r.into_json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": crate::find_program(CHROMIUM).map(|p| p.display().to_string()),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000",
                         "--no-first-run", "--disable-extensions"],
            },
        }}});
        let v = b
            .send("POST", "/session", Some(caps))
            .unwrap_or_else(|e| panic!("no browser session: {e}"));
        let id = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {v}"))
            .to_owned();
        b.base = format!("{}/session/{id}", b.base);
        b
    }

    /// Sends one command; the `value` of its answer, or the driver's error.
    fn send(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, DriverError> {
        let url = format!("{}{path}", self.base);
        let req = self.agent.request(method, &url);
        let resp = match body {
            Some(b) => req.send_json(b),
            None if method == "POST" => req.send_json(json!({})),
            None => req.call(),
        };
        let v: Value = match resp {
            Ok(r) => r.into_json().unwrap_or(Value::Null),
            Err(ureq::Error::Status(_, r)) => r.into_json().unwrap_or(Value::Null),
            Err(e) => {
                return Err(DriverError {
                    error: "transport".into(),
                    message: e.to_string(),
                })
            }
        };
        let value = v["value"].clone();
        match value["error"].as_str() {
            Some(err) => Err(DriverError {
                error: err.to_owned(),
                message: value["message"].as_str().unwrap_or_default().to_owned(),
            }),
            None => Ok(value),
        }
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.send(method, path, body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    /// Opens `url` and waits for its load.
    pub fn goto(&self, url: &str) {
        self.ok("POST", "/url", Some(json!({ "url": url })));
    }

    /// The elements matching the CSS `selector`, in document order.
    pub fn all(&self, selector: &str) -> Vec<Element> {
        let v = self.ok(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": selector})),
        );
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(|s| Element(s.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The first element matching `selector`, if any.
    pub fn find(&self, selector: &str) -> Option<Element> {
        self.all(selector).into_iter().next()
    }

    /// Waits up to `secs` for an element matching `selector`.
    pub fn wait(&self, secs: u64, selector: &str) -> Element {
        self.wait_for(secs, &format!("an element {selector}"), || {
            self.find(selector)
        })
    }

    /// Polls `f` every 50 ms until it gives `Some`, for up to `secs`; on
    /// time out panics, naming `what`, with the page's visible text.
    pub fn wait_for<T>(&self, secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = f() {
                return v;
            }
            if Instant::now() >= deadline {
                let text = self.find("body").map(|b| self.text(&b)).unwrap_or_default();
                panic!("gave up after {secs} s waiting for {what}; the page shows:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn click(&self, e: &Element) {
        self.ok("POST", &format!("/element/{}/click", e.0), None);
    }

    /// Waits up to `secs` for an element matching `selector` and clicks it,
    /// finding it again when the page drew itself anew in between (a view
    /// that follows the farm redraws every few seconds, and an element
    /// found before a redraw is stale after it).
    pub fn click_on(&self, secs: u64, selector: &str) {
        self.wait_for(secs, &format!("a click on {selector}"), || {
            let e = self.find(selector)?;
            match self.send("POST", &format!("/element/{}/click", e.0), None) {
                Ok(_) => Some(()),
                Err(err) if err.error == "stale element reference" => None,
                Err(err) => panic!("WebDriver click on {selector}: {err}"),
            }
        })
    }

    /// Types `text` into the element (a key event per character).
    pub fn type_text(&self, e: &Element, text: &str) {
        self.ok(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": text })),
        );
    }

    pub fn clear(&self, e: &Element) {
        self.ok("POST", &format!("/element/{}/clear", e.0), None);
    }

    /// The element's rendered text.
    pub fn text(&self, e: &Element) -> String {
        self.send("GET", &format!("/element/{}/text", e.0), None)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// The element's attribute (or property) `name`.
    pub fn attr(&self, e: &Element, name: &str) -> Option<String> {
        self.send("GET", &format!("/element/{}/attribute/{name}", e.0), None)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
    }

    /// Runs `script` (a function body) in the page; its return value.
    pub fn script(&self, script: &str, args: Vec<Value>) -> Value {
        self.ok(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// The text of an open alert, confirm or prompt, if one is open.
    pub fn alert_text(&self) -> Option<String> {
        self.send("GET", "/alert/text", None)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.send("DELETE", "", None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
