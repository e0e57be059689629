-- Argo CD health of a Kiln TrainingJob (resource.customizations.health.kiln.dev_TrainingJob).
-- Healthy once it succeeded, Degraded when it failed for good (Stalled), Suspended while
-- spec.runPolicy.suspend holds it, Progressing otherwise (pending, running, or not yet seen by the
-- operator at this generation).
local hs = {}

local function condition(kind)
  if obj.status ~= nil and obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == kind then
        return c
      end
    end
  end
  return nil
end

local function detail(prefix)
  local text = prefix
  if obj.status.reason ~= nil and obj.status.reason ~= "" then
    text = text .. " (" .. obj.status.reason .. ")"
  end
  if obj.status.message ~= nil and obj.status.message ~= "" then
    text = text .. ": " .. obj.status.message
  end
  return text
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Kiln operator"
  return hs
end

local generation = obj.metadata.generation
if obj.status.observedGeneration ~= nil and generation ~= nil and obj.status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Kiln operator to observe generation " .. generation
  return hs
end

local ready = condition("Ready")
local stalled = condition("Stalled")
local phase = obj.status.phase

if (ready ~= nil and ready.status == "True") or (ready == nil and phase == "Succeeded") then
  hs.status = "Healthy"
  hs.message = detail("Succeeded")
  return hs
end
if (stalled ~= nil and stalled.status == "True") or (stalled == nil and phase == "Failed") then
  hs.status = "Degraded"
  hs.message = detail("Failed")
  return hs
end
if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = detail("Suspended")
  return hs
end

local text = phase
if phase == "Running" and obj.status.progress ~= nil and obj.status.progress.percent ~= nil then
  text = text .. " " .. obj.status.progress.percent .. "%"
end
hs.status = "Progressing"
hs.message = detail(text)
return hs
