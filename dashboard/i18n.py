"""UI strings in zh-CN and en, the language choice, and locale-aware money, number and date formats.

The language comes from ``?lang=`` (which the pages remember in a ``lang`` cookie), then the
cookie, then ``Accept-Language`` (any ``zh*`` means zh-CN); everything else is English.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Final
from zoneinfo import ZoneInfo

ZH: Final = "zh-CN"
EN: Final = "en"
LANGUAGES: Final = (ZH, EN)
DEFAULT_LANGUAGE: Final = EN
COOKIE: Final = "lang"

MESSAGES: dict[str, dict[str, str]] = {
    "app_name": {ZH: "StorePulse 门店脉搏", EN: "StorePulse"},
    "revised_on": {ZH: "已修订 {when}", EN: "revised {when}"},
    "revised_hint": {
        ZH: "迟到的数据（如离线收银台补传）在首次统计后改变了这一天的数字；时间为本地时间",
        EN: "late data (an offline till catching up, say) changed this day's figures after they were first shown"
        "; local time",
    },
    "chain_overview": {ZH: "连锁总览", EN: "Chain overview"},
    "all_stores": {ZH: "全部门店", EN: "All stores"},
    "today": {ZH: "今日", EN: "Today"},
    "business_day": {ZH: "营业日", EN: "Business day"},
    "sales": {ZH: "销售额", EN: "Sales"},
    "transactions": {ZH: "交易笔数", EN: "Transactions"},
    "visitors": {ZH: "进店人数", EN: "Visitors"},
    "conversion": {ZH: "转化率", EN: "Conversion"},
    "average_ticket": {ZH: "客单价", EN: "Average ticket"},
    "returns": {ZH: "退货笔数", EN: "Returns"},
    "by_hour": {ZH: "分时段", EN: "By hour"},
    "hour": {ZH: "时段", EN: "Hour"},
    "latest_receipts": {ZH: "最新小票", EN: "Latest receipts"},
    "time": {ZH: "时间", EN: "Time"},
    "receipt": {ZH: "小票号", EN: "Receipt"},
    "terminal": {ZH: "收银台", EN: "Till"},
    "kind": {ZH: "类型", EN: "Kind"},
    "kind_sale": {ZH: "销售", EN: "sale"},
    "kind_return": {ZH: "退货", EN: "return"},
    "items": {ZH: "商品", EN: "Items"},
    "staff": {ZH: "店员", EN: "Staff"},
    "member": {ZH: "会员", EN: "Member"},
    "total": {ZH: "金额", EN: "Total"},
    "store": {ZH: "门店", EN: "Store"},
    "city": {ZH: "城市", EN: "City"},
    "region": {ZH: "区域", EN: "Region"},
    "chain_total": {ZH: "全连锁合计", EN: "Chain total"},
    "region_total": {ZH: "区域合计", EN: "Region total"},
    "stores_count": {ZH: "{count} 家门店", EN: "{count} stores"},
    "updated": {ZH: "更新于 {time}", EN: "Updated {time}"},
    "live_hint": {ZH: "页面每 3 秒自动刷新", EN: "This page updates itself every 3 seconds"},
    "no_receipts": {ZH: "今日暂无小票", EN: "No receipts yet today"},
    "no_stores": {ZH: "尚无门店：请先导入主数据", EN: "No stores yet: import the master data first"},
    "counter_flow": {ZH: "五步法", EN: "Counter flow"},
    "not_found": {ZH: "未找到", EN: "Not found"},
    "store_not_found": {ZH: "门店 {store_id} 不存在。", EN: "There is no store {store_id}."},
    "back_to_chain": {ZH: "返回连锁总览", EN: "Back to the chain overview"},
    "timezone": {ZH: "时区", EN: "Time zone"},
    "switch_to": {ZH: "English", EN: "中文"},
    "login": {ZH: "登录", EN: "Sign in"},
    "logout": {ZH: "退出", EN: "Sign out"},
    "user_id": {ZH: "用户名", EN: "User name"},
    "password": {ZH: "密码", EN: "Password"},
    # One message for every refusal (unknown user, wrong password, locked, disabled): it must not
    # tell which accounts exist.
    "login_refused": {
        ZH: "无法登录：用户名或密码不正确，或账户因多次输错已暂时锁定（15 分钟）。",
        EN: "Could not sign in: wrong user name or password, or the account is locked for 15 minutes "
        "after repeated wrong passwords.",
    },
    "login_throttled": {
        ZH: "此地址的登录尝试过于频繁，请稍后再试。",
        EN: "Too many sign-in attempts from this address; please wait a minute and try again.",
    },
    "login_csrf": {ZH: "登录表单已过期，请重新提交。", EN: "The sign-in form expired; please submit it again."},
    "forbidden": {ZH: "无权访问", EN: "Not allowed"},
    "store_forbidden": {ZH: "您无权查看门店 {store_id}。", EN: "You may not see store {store_id}."},
    "back_home": {ZH: "返回首页", EN: "Back to the start page"},
    "aggregates_only": {
        ZH: "其他区域仅显示合计。",
        EN: "Other regions show totals only.",
    },
    "pending_promotions": {ZH: "待审批促销", EN: "Promotions to approve"},
    "active_promotions": {ZH: "进行中的促销", EN: "Active promotions"},
    "set_version": {ZH: "（促销版本 v{version}）", EN: "(promotion set v{version})"},
    "promotion": {ZH: "促销", EN: "Promotion"},
    "why": {ZH: "依据", EN: "Why"},
    "decide_by": {ZH: "审批截止", EN: "Decide by"},
    "decision": {ZH: "审批", EN: "Decision"},
    "approve": {ZH: "批准", EN: "Approve"},
    "reject": {ZH: "驳回", EN: "Reject"},
    "reject_reason": {ZH: "驳回原因（必填）", EN: "Reason (required)"},
    "manager_decides": {ZH: "由本店店长或总部审批", EN: "The store's manager or headquarters decides"},
    "approved_published": {
        ZH: "已批准，已发布到本店所有收银台。",
        EN: "Approved and published to every till of the store.",
    },
    "rejected_done": {ZH: "已驳回。", EN: "Rejected."},
    "no_pending_promotions": {ZH: "暂无待审批的促销。", EN: "No promotion waits for a decision."},
    "no_active_promotions": {ZH: "暂无进行中的促销。", EN: "No active promotion."},
    "ends": {ZH: "结束时间", EN: "Ends"},
    "execution_rate": {ZH: "促销核销率", EN: "Execution rate"},
    "tills_not_acked": {ZH: "未确认的收银台", EN: "Tills that never acknowledged"},
    "delivered_version": {ZH: "已送达版本", EN: "Delivered version"},
    "acked_at": {ZH: "确认时间", EN: "Acknowledged at"},
    "evidence_stock": {
        ZH: "库存 {on_hand}，安全库存 {safety}，近 7 天销量 +{growth}%",
        EN: "on hand {on_hand}, safety stock {safety}, sales +{growth} % week on week",
    },
    "evidence_expiry": {
        ZH: "{lots} 个批次共 {units} 件将在 {days} 天内到期",
        EN: "{units} units in {lots} lot(s) expire within {days} days",
    },
    "param_percent": {ZH: "折扣 %", EN: "Discount %"},
    "param_amount": {ZH: "立减（元）", EN: "Amount off (¥)"},
    "param_buy": {ZH: "买", EN: "Buy"},
    "param_get": {ZH: "送", EN: "Get"},
    "param_min_qty": {ZH: "满（件）", EN: "Min. units"},
    "param_gift_qty": {ZH: "赠品数量", EN: "Gifts"},
    "stock_risks": {ZH: "库存与效期风险", EN: "Stock and expiry risks"},
    "no_stock_risks": {ZH: "暂无库存或效期风险。", EN: "No stock or expiry risk."},
    "sku": {ZH: "商品", EN: "SKU"},
    "risk": {ZH: "风险", EN: "Risk"},
    "on_hand": {ZH: "库存", EN: "On hand"},
    "safety_stock": {ZH: "安全库存", EN: "Safety stock"},
    "days_of_cover": {ZH: "可售天数", EN: "Days of cover"},
    "lead_time": {ZH: "补货周期（天）", EN: "Lead time (days)"},
    "expiring_units": {ZH: "临期数量", EN: "Expiring units"},
    "first_expiry": {ZH: "最早到期", EN: "First expiry"},
    "risk_below_safety": {ZH: "低于安全库存", EN: "below safety stock"},
    "risk_stockout": {ZH: "即将断货", EN: "stock-out soon"},
    "risk_expiry": {ZH: "临期", EN: "near expiry"},
    "open_alerts": {ZH: "未关闭的预警", EN: "Open alerts"},
    "no_open_alerts": {ZH: "暂无未关闭的预警。", EN: "No open alert."},
    "alert": {ZH: "预警", EN: "Alert"},
    "status": {ZH: "状态", EN: "Status"},
    "status_open": {ZH: "待处理", EN: "open"},
    "status_acknowledged": {ZH: "已确认", EN: "acknowledged"},
    "status_resolved": {ZH: "已关闭", EN: "resolved"},
    "raised_at": {ZH: "触发时间", EN: "Raised"},
    "acknowledge": {ZH: "确认", EN: "Acknowledge"},
    "handle": {ZH: "处理", EN: "Follow-up"},
    "resolve": {ZH: "关闭", EN: "Resolve"},
    "note": {ZH: "备注", EN: "Note"},
    "rule": {ZH: "规则", EN: "Rule"},
    "severity": {ZH: "级别", EN: "Severity"},
    "level": {ZH: "当前处理人", EN: "With"},
    "evidence": {ZH: "证据", EN: "Evidence"},
    "customer": {ZH: "顾客", EN: "Customer"},
    "withheld": {ZH: "（不向总部显示）", EN: "(not shown chain-wide)"},
    "symptom_keywords": {ZH: "症状关键词", EN: "Symptom keywords"},
    "reason": {ZH: "原因", EN: "Reason"},
    "history": {ZH: "处理记录", EN: "History"},
    "action": {ZH: "操作", EN: "Action"},
    "by": {ZH: "操作人", EN: "By"},
    "compare_stores": {ZH: "门店对比（{day}）", EN: "Stores compared ({day})"},
    "pass_rate_trend": {ZH: "医保核验通过率趋势（近 14 天）", EN: "Insurance pass rate, last 14 days"},
    "metric_insurance_pass_rate": {ZH: "医保核验通过率", EN: "Insurance pass rate"},
    "metric_step_completeness": {ZH: "过程数据完整率", EN: "Step completeness"},
    "metric_symptom_completeness": {ZH: "症状记录完整率", EN: "Symptom-record completeness"},
    "metric_traceability": {ZH: "销售行为可追溯率", EN: "Traceability"},
    "metric_conversion_rate": {ZH: "转化率", EN: "Conversion"},
    "morning_report": {ZH: "晨会报告", EN: "Morning meeting report"},
    "export_xlsx": {ZH: "导出 Excel", EN: "Export XLSX"},
    "export_csv": {ZH: "导出 CSV", EN: "Export CSV"},
    "print_hint": {ZH: "打印：Ctrl+P（已适配纸张）", EN: "Print with Ctrl+P (laid out for paper)"},
    "exceptions": {ZH: "异常", EN: "Exceptions"},
    "no_exceptions": {ZH: "昨日无异常。", EN: "No exception yesterday."},
    "ranking": {ZH: "门店排名", EN: "Stores ranked"},
    "morning_definitions": {
        ZH: "异常：医保核验通过率低于 65%，过程数据、症状记录、可追溯率、预警响应及时率低于 80%，促销核销率低于 70%。"
        "比率为当日各门店分子、分母之和相除；无数据显示为 –。",
        EN: "Exceptions: insurance pass rate below 65 %; step, symptom-record, traceability and alert-response "
        "timeliness below 80 %; promotion execution below 70 %. Ratios divide the day's summed cases; – means no case.",
    },
    "period_title": {ZH: "近 {days} 天", EN: "Last {days} days"},
    "days_n": {ZH: "{days} 天", EN: "{days} days"},
    "trend": {ZH: "趋势", EN: "Trend"},
    "chart_numbers": {ZH: "图表数据", EN: "The chart's numbers"},
    "regions_compared": {ZH: "区域对比", EN: "Regions compared"},
    "nav_chain": {ZH: "连锁", EN: "Chain"},
    "nav_region": {ZH: "我的区域", EN: "My region"},
    "nav_store": {ZH: "我的门店", EN: "My store"},
    "promotions": {ZH: "促销", EN: "Promotions"},
    "rules": {ZH: "规则", EN: "Rules"},
    "audit_log": {ZH: "审计日志", EN: "Audit log"},
    "dead_letters": {ZH: "死信", EN: "Dead letters"},
    "dead_letter": {ZH: "死信", EN: "Dead letter"},
    "dead_letters_hint": {
        ZH: "接入时被拒收的数据及原因。修复原因（例如导入缺少的门店）后可重放：重放会按今天的主数据重新校验，"
        "通过的只入库一次，死信保留并标记为已重放。",
        EN: "What ingest refused, with the reason. Once the cause is fixed (an unknown store imported, say), replay "
        "validates it again against today's master data; what passes is stored once and the letter is kept, "
        "marked replayed.",
    },
    "dead_letters_count": {
        ZH: "共 {total} 条，显示 {shown} 条（最新在前）",
        EN: "{shown} of {total} shown, newest first",
    },
    "no_dead_letters": {ZH: "没有符合条件的死信。", EN: "No dead letter matches."},
    "received_at": {ZH: "接收时间", EN: "Received"},
    "event_id": {ZH: "事件编号", EN: "Event ID"},
    "step_consultation": {ZH: "问诊", EN: "Consultation"},
    "step_symptoms": {ZH: "症状记录", EN: "Symptoms"},
    "step_recommendation": {ZH: "推荐用药", EN: "Recommendation"},
    "step_insurance_check": {ZH: "医保核验", EN: "Insurance check"},
    "step_guidance": {ZH: "用药指导", EN: "Guidance"},
    "step_status_done": {ZH: "已完成", EN: "done"},
    "step_status_skipped": {ZH: "已跳过", EN: "skipped"},
    "step_data_text": {ZH: "记录", EN: "Note"},
    "step_data_keywords": {ZH: "关键词", EN: "Keywords"},
    "step_data_skus": {ZH: "商品", EN: "Items"},
    "step_data_result": {ZH: "结果", EN: "Result"},
    "step_data_reason": {ZH: "原因", EN: "Reason"},
    "step_result_pass": {ZH: "通过", EN: "pass"},
    "step_result_fail": {ZH: "未通过", EN: "fail"},
    "severity_low": {ZH: "低", EN: "low"},
    "severity_medium": {ZH: "中", EN: "medium"},
    "severity_high": {ZH: "高", EN: "high"},
    "severity_critical": {ZH: "紧急", EN: "critical"},
    "transition_raised": {ZH: "触发", EN: "raised"},
    "transition_acknowledged": {ZH: "确认", EN: "acknowledged"},
    "transition_resolved": {ZH: "关闭", EN: "resolved"},
    "transition_escalated": {ZH: "升级", EN: "escalated"},
    "actor_system": {ZH: "系统", EN: "system"},
    "replay": {ZH: "重放", EN: "Replay"},
    "replay_note": {ZH: "重放结果", EN: "Replay outcome"},
    "replay_now": {ZH: "立即重放", EN: "Replay now"},
    "replay_hint": {
        ZH: "按今天的主数据重新校验；仍不通过则记录新原因，不会再生成死信。",
        EN: "Validates again against today's master data; if it still fails, the new reason is recorded and no "
        "second dead letter is written.",
    },
    "replay_state_pending": {ZH: "未重放", EN: "not replayed"},
    "replay_state_replayed": {ZH: "已重放", EN: "replayed"},
    "replay_state_accepted": {ZH: "已重放：已入库", EN: "replayed: stored"},
    "replay_state_duplicate": {ZH: "已重放：此前已入库", EN: "replayed: already stored"},
    "replay_state_rejected": {ZH: "重放被拒", EN: "replay rejected"},
    "raw_payload": {ZH: "原始数据", EN: "Raw payload"},
    "raw_payload_hint": {
        ZH: "顾客姓名已脱敏、症状已隐去；原样内容请在服务器上运行 storepulse dead-letters show 查看。",
        EN: "Customer names masked and symptoms withheld; the payload exactly as received: "
        "storepulse dead-letters show ID on the server.",
    },
    "trace": {ZH: "销售追溯", EN: "Sale trace"},
    "violation": {ZH: "合规问题，缺少步骤", EN: "Compliance issue, steps missing"},
    "first_contact": {ZH: "首次接触", EN: "First contact"},
    "step": {ZH: "步骤", EN: "Step"},
    "detail": {ZH: "内容", EN: "Detail"},
    "superseded": {ZH: "（已更正）", EN: "(corrected)"},
    "no_consultation": {ZH: "本单无问诊记录。", EN: "No consultation for this sale."},
    "prompt_answers": {ZH: "扫码提示回答", EN: "Prompt answers"},
    "all": {ZH: "全部", EN: "All"},
    "created": {ZH: "创建时间", EN: "Created"},
    "decide": {ZH: "去审批", EN: "Decide"},
    "no_promotions": {ZH: "暂无促销。", EN: "No promotion."},
    "promotion_status_pending": {ZH: "待审批", EN: "pending"},
    "promotion_status_active": {ZH: "进行中", EN: "active"},
    "promotion_status_rejected": {ZH: "已驳回", EN: "rejected"},
    "promotion_status_expired": {ZH: "已过期", EN: "expired"},
    "promotion_status_retracted": {ZH: "已撤回", EN: "retracted"},
    "promotion_status_ended": {ZH: "已结束", EN: "ended"},
    "type": {ZH: "类型", EN: "Type"},
    "version": {ZH: "版本", EN: "Version"},
    "versions": {ZH: "版本记录", EN: "Versions"},
    "enabled": {ZH: "启用", EN: "enabled"},
    "draft": {ZH: "草稿", EN: "draft"},
    "cadence": {ZH: "频率", EN: "Cadence"},
    "loaded_at": {ZH: "加载时间", EN: "Loaded"},
    "source": {ZH: "来源", EN: "Source"},
    "backtest": {ZH: "回测", EN: "Back-test"},
    "from": {ZH: "从", EN: "From"},
    "to": {ZH: "到", EN: "To"},
    "run_backtest": {ZH: "运行回测（不发送通知）", EN: "Run (notifies nobody)"},
    "backtest_found": {ZH: "该期间将触发 {count} 条预警。", EN: "{count} alert(s) would have been raised."},
    "resolved_on": {ZH: "关闭日期", EN: "Resolved on"},
    "target": {ZH: "对象", EN: "Target"},
    "filter": {ZH: "筛选", EN: "Filter"},
    "flow_by_staff": {ZH: "今日五步法执行（按店员）", EN: "Counter flow today, by staff member"},
    "consultations": {ZH: "问诊数", EN: "Consultations"},
    "steps_done": {ZH: "步骤完成率", EN: "Steps done"},
    "steps_skipped": {ZH: "跳过步骤", EN: "Steps skipped"},
    "unknown_staff": {ZH: "未记录店员", EN: "no staff recorded"},
    "no_consultations_today": {ZH: "今日暂无问诊。", EN: "No consultation today yet."},
    "answer": {ZH: "回答", EN: "Answer"},
    "count": {ZH: "次数", EN: "Count"},
    "share": {ZH: "占比", EN: "Share"},
    "no_prompt_answers": {ZH: "今日暂无扫码提示回答。", EN: "No prompt answered today yet."},
    "answer_doctor": {ZH: "医生推荐", EN: "doctor's recommendation"},
    "answer_referral": {ZH: "老客转介", EN: "returning-customer referral"},
    "answer_poster": {ZH: "海报引导", EN: "in-store poster"},
    "role_staff": {ZH: "店员", EN: "store staff"},
    "role_manager": {ZH: "店长", EN: "store manager"},
    "role_supervisor": {ZH: "区域督导", EN: "region supervisor"},
    "role_headquarters": {ZH: "总部", EN: "headquarters"},
    "role_admin": {ZH: "管理员", EN: "admin"},
    "api_docs": {ZH: "API 文档", EN: "API docs"},
    "footer": {ZH: "StorePulse · 事件契约 v1", EN: "StorePulse · event contract v1"},
    "definitions": {
        ZH: "转化率 = 交易笔数 ÷ 进店人数；客单价 = 销售额 ÷ 交易笔数；销售额已扣除退货。",
        EN: "Conversion = transactions ÷ visitors; average ticket = sales ÷ transactions; sales are net of returns.",
    },
}

_WEEKDAYS_ZH = ("星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日")
_WEEKDAYS_EN = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS_EN = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_CENT = Decimal("0.01")


def normalise_language(value: str | None) -> str | None:
    """``zh``, ``zh-cn``, ``zh_Hans`` ... → zh-CN; ``en-GB`` ... → en; anything else → None."""
    if not value:
        return None
    tag = value.strip().lower().replace("_", "-")
    if tag == "zh" or tag.startswith("zh-"):
        return ZH
    if tag == "en" or tag.startswith("en-"):
        return EN
    return None


def from_accept_language(header: str | None) -> str:
    """The first supported language of an Accept-Language header by quality; English otherwise."""
    if not header:
        return DEFAULT_LANGUAGE
    ranked: list[tuple[float, int, str]] = []
    for position, part in enumerate(header.split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                quality = float(params[2:])
            except ValueError:
                quality = 0.0
        if tag and quality > 0:
            ranked.append((-quality, position, tag))
    for _, _, tag in sorted(ranked):
        language = normalise_language(tag)
        if language is not None:
            return language
    return DEFAULT_LANGUAGE


def choose_language(query: str | None, cookie: str | None, accept_language: str | None) -> str:
    return normalise_language(query) or normalise_language(cookie) or from_accept_language(accept_language)


@dataclass(frozen=True)
class Translator:
    """Strings and formats of one language; templates call it as ``t("key")`` and ``t.money(x)``."""

    lang: str

    def __call__(self, key: str, **values: object) -> str:
        entry = MESSAGES.get(key)
        if entry is None:
            return key
        text = entry.get(self.lang) or entry[EN]
        return text.format(**values) if values else text

    def text_or(self, key: str, default: str) -> str:
        """The key's text, or `default` when there is none (free-text answers, say)."""
        return self(key) if key in MESSAGES else default

    @property
    def other(self) -> str:
        return EN if self.lang == ZH else ZH

    @property
    def is_zh(self) -> bool:
        return self.lang == ZH

    def pick(self, zh: str | None, en: str | None) -> str:
        """The name in this language, falling back to the other one."""
        return (zh or en or "") if self.is_zh else (en or zh or "")

    def money(self, value: Decimal | int | float | None) -> str:
        """¥1,234.50 (both languages write yuan this way); -¥12.50 for negatives; – for none."""
        if value is None:
            return "–"
        amount = Decimal(str(value)).quantize(_CENT, rounding=ROUND_HALF_UP)
        sign = "-" if amount < 0 else ""
        return f"{sign}¥{abs(amount):,.2f}"

    def number(self, value: int | None) -> str:
        return "–" if value is None else f"{value:,}"

    def percent(self, value: float | None, digits: int = 1) -> str:
        return "–" if value is None else f"{value * 100:.{digits}f}%"

    def date(self, value: dt.date) -> str:
        if self.is_zh:
            return f"{value.year}年{value.month}月{value.day}日 {_WEEKDAYS_ZH[value.weekday()]}"
        return f"{_WEEKDAYS_EN[value.weekday()]}, {value.day} {_MONTHS_EN[value.month - 1]} {value.year}"

    def time(self, value: dt.datetime, seconds: bool = True) -> str:
        return value.strftime("%H:%M:%S" if seconds else "%H:%M")

    def local(self, value: dt.datetime | str, zone: str | ZoneInfo) -> dt.datetime:
        """A stored instant (a datetime or an ISO string; naive means UTC, as SQLite returns it) in `zone`."""
        moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        return moment.astimezone(zone if isinstance(zone, ZoneInfo) else ZoneInfo(zone))

    def hour_range(self, hour: int) -> str:
        return f"{hour:02d}:00–{(hour + 1) % 24:02d}:00"


def translator(lang: str | None) -> Translator:
    return Translator(normalise_language(lang) or DEFAULT_LANGUAGE)
